//! Loading: the file, its drop-ins, the user-data (from IMDS or given) and
//! the environment, in precedence order.

use super::{
    input, invalid, merge, model, parse_env, parse_toml, schema, userdata, value, Error, Layer,
    Literal, Loaded, Problem, ProblemKind, Source,
};
use std::future::Future;
use std::path::{Path, PathBuf};

/// Where user-data comes from when loading.
#[derive(Debug, Clone)]
pub enum UserData {
    /// Ask IMDS (unless `imds.user_data = false`).
    FromImds,
    /// Read this file instead (operators checking a launch template offline).
    File(PathBuf),
    /// Ignore user-data.
    Skip,
}

/// Why [`UserDataSource`] could not fetch the user-data (the IMDS client's error).
pub type FetchError = Box<dyn std::error::Error + Send + Sync>;

/// Where [`UserData::FromImds`] comes from: on a node, the IMDS client
/// (`identity::UserDataFromImds`). Injected rather than called so that the
/// configuration sits below the instance identity, which is configured by it.
pub trait UserDataSource {
    /// The raw user-data (`None`: the instance has none), read with `settings`.
    fn user_data(
        &self,
        settings: &model::Imds,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, FetchError>>;
}

/// A [`UserDataSource`] for callers that never ask IMDS: [`UserData::FromImds`] fails.
pub struct NoUserDataSource;

impl UserDataSource for NoUserDataSource {
    async fn user_data(&self, _settings: &model::Imds) -> Result<Option<Vec<u8>>, FetchError> {
        Err("no instance metadata client in this caller".into())
    }
}

/// Everything [`load_with`] reads, made explicit so tests control it.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub path: PathBuf,
    pub user_data: UserData,
    pub env: Vec<(String, String)>,
}

impl LoadOptions {
    /// Options for the running process: its environment, user-data from IMDS.
    pub fn from_process(path: PathBuf, user_data: UserData) -> Self {
        LoadOptions {
            path,
            user_data,
            env: std::env::vars().collect(),
        }
    }
}

/// Reads every source but IMDS user-data, merges and validates: for callers
/// off a node (tests, `--user-data FILE`). `UserData::FromImds` fails here
/// (KB-CONFIG-004); a node loads with [`load_with`] and the IMDS client.
pub async fn load_offline(opts: &LoadOptions) -> Result<Loaded, Error> {
    load_with(opts, &NoUserDataSource).await
}

/// Reads every source, user-data from `imds` when asked to, merges and validates.
pub async fn load_with(opts: &LoadOptions, imds: &impl UserDataSource) -> Result<Loaded, Error> {
    let mut problems = Vec::new();
    let text = read_text(&opts.path)?;
    let mut layers = vec![parse_toml(
        Source::File(opts.path.clone()),
        &text,
        &mut problems,
    )];
    for path in drop_ins(&opts.path)? {
        let text = read_text(&path)?;
        layers.push(parse_toml(Source::DropIn(path), &text, &mut problems));
    }
    let env_layers = parse_env(
        opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        &mut problems,
    );

    let raw_user_data = match &opts.user_data {
        UserData::Skip => None,
        UserData::File(path) => Some(read_bounded(path)?),
        UserData::FromImds => {
            let local: Vec<Layer> = layers.iter().chain(&env_layers).cloned().collect();
            let settings = imds_settings(&local);
            if settings.user_data {
                match imds.user_data(&settings).await {
                    Ok(raw) => raw,
                    // The local sources' own problems are the operator's to
                    // fix whatever instance metadata does (exit 2, not 1).
                    Err(source) if !problems.is_empty() => {
                        return Err(invalid(problems, Some(source.to_string())))
                    }
                    Err(source) => return Err(Error::Imds { source }),
                }
            } else {
                None
            }
        }
    };
    if let Some(raw) = raw_user_data {
        match userdata::extract(&raw) {
            Ok(Some(found)) => layers.push(parse_toml(
                Source::UserData(found.origin),
                &found.text,
                &mut problems,
            )),
            Ok(None) => tracing::debug!("user-data holds no kubeboot configuration"),
            Err(e) => problems.push(Problem {
                kind: match e {
                    userdata::UserDataError::MultipleParts(_) => ProblemKind::Conflict,
                    userdata::UserDataError::TooLarge { .. } => ProblemKind::OutOfRange,
                    _ => ProblemKind::Syntax,
                },
                source: Source::UserData("document"),
                key: "user-data".into(),
                value: None,
                reason: e.to_string(),
                expected: format!(
                    "one MIME part of type {} holding TOML, or a plain TOML body",
                    userdata::CONTENT_TYPE
                ),
            }),
        }
    }
    layers.extend(env_layers);
    merge(&layers, problems)
}

/// Reads a config file or drop-in: a regular file of at most
/// [`input::MAX_BYTES`], as UTF-8.
fn read_text(path: &Path) -> Result<String, Error> {
    String::from_utf8(read_bounded(path)?).map_err(|e| Error::Read {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
    })
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, Error> {
    input::read_file(path, input::MAX_BYTES).map_err(|e| match e {
        input::ReadError::NotRegular(kind) => Error::NotRegular {
            path: path.to_path_buf(),
            kind,
        },
        input::ReadError::TooLarge { limit } => Error::TooLarge {
            path: path.to_path_buf(),
            limit,
        },
        input::ReadError::Io(source) => Error::Read {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// The drop-in files next to the config file, in the order they apply.
pub fn drop_ins(config_path: &Path) -> Result<Vec<PathBuf>, Error> {
    let dir = config_path
        .parent()
        .unwrap_or(Path::new("/"))
        .join("config.d");
    let listing = match std::fs::read_dir(&dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::DropInDir { path: dir, source }),
    };
    let mut files = Vec::new();
    for entry in listing {
        let path = entry
            .map_err(|source| Error::DropInDir {
                path: dir.clone(),
                source,
            })?
            .path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// IMDS settings from the local sources only (user-data cannot set them).
pub fn imds_settings(layers: &[Layer]) -> model::Imds {
    let pick = |path: &str| {
        layers
            .iter()
            .rev()
            .flat_map(|l| l.entries.iter())
            .find(|(k, _)| k.path == path)
            .map(|(_, v)| v.clone())
            .or_else(|| {
                schema::find(path)
                    .and_then(|k| k.default)
                    .and_then(toml::Value::deserialize_literal)
            })
    };
    let dur = |path: &str, fallback: u64| {
        pick(path)
            .and_then(|v| v.as_str().and_then(value::parse_duration))
            .unwrap_or(std::time::Duration::from_secs(fallback))
    };
    model::Imds {
        endpoint: pick("imds.endpoint")
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "http://169.254.169.254".into()),
        user_data: pick("imds.user_data")
            .and_then(|v| v.as_bool())
            .unwrap_or(true),
        request_timeout: dur("imds.request_timeout", 2),
        deadline: dur("imds.deadline", 300),
    }
}
