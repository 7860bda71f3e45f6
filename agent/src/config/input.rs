//! Reading configuration input with bounds: a path that is no regular file
//! (a device, a FIFO) is refused before it is read, a file is read up to a
//! size limit and refused past it (never truncated), and nesting too deep
//! for the parser is refused before parsing.

use std::io::Read;
use std::path::Path;

/// Largest configuration file, drop-in or user-data file accepted. Real ones
/// are a few KiB (EC2 user-data is at most 16 KiB); the limit only has to
/// stop a runaway input.
pub const MAX_BYTES: u64 = 1024 * 1024;

/// Deepest `[`/`{` nesting accepted in a TOML document; known keys need 2.
pub const MAX_DEPTH: usize = 32;

/// Why a path could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// Not a regular file: what it is instead.
    NotRegular(&'static str),
    /// Larger than the limit.
    TooLarge {
        limit: u64,
    },
    Io(std::io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::NotRegular(kind) => write!(f, "not a regular file but {kind}"),
            ReadError::TooLarge { limit } => write!(f, "larger than {limit} bytes"),
            ReadError::Io(e) => e.fmt(f),
        }
    }
}

impl ReadError {
    /// As an I/O error, for callers whose errors carry one.
    pub fn into_io(self) -> std::io::Error {
        match self {
            ReadError::Io(e) => e,
            ReadError::NotRegular(_) => {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, self.to_string())
            }
            ReadError::TooLarge { .. } => {
                std::io::Error::new(std::io::ErrorKind::InvalidData, self.to_string())
            }
        }
    }
}

/// Reads a whole regular file of at most `limit` bytes. A FIFO or device is
/// refused by its metadata before it is opened, and the handle is opened
/// non-blocking and checked again (a path swapped in between cannot block).
pub fn read_file(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    use std::os::unix::fs::OpenOptionsExt;
    let meta = std::fs::metadata(path).map_err(ReadError::Io)?;
    file_kind(&meta.file_type()).map_or(Ok(()), |k| Err(ReadError::NotRegular(k)))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(ReadError::Io)?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    file_kind(&meta.file_type()).map_or(Ok(()), |k| Err(ReadError::NotRegular(k)))?;
    if meta.len() > limit {
        return Err(ReadError::TooLarge { limit });
    }
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge { limit });
    }
    Ok(bytes)
}

/// `None` for a regular file, else what it is, for the message.
fn file_kind(t: &std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    }
}

/// Human size of a limit, e.g. `1 MiB`.
pub fn size(limit: u64) -> String {
    if limit.is_multiple_of(1024 * 1024) {
        format!("{} MiB", limit / (1024 * 1024))
    } else if limit.is_multiple_of(1024) {
        format!("{} KiB", limit / 1024)
    } else {
        format!("{limit} bytes")
    }
}

/// The 1-based line of the first `[`/`{` nested deeper than `max`, outside
/// strings and comments; `None` when the document stays within it. A
/// conservative scan: it only has to keep the recursive parser (and the
/// recursive drop of what it builds) off a pathological input.
pub fn too_deep(text: &str, max: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut line = 1usize;
    let mut i = 0usize;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => line += 1,
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            q @ (b'"' | b'\'') => {
                let triple = bytes[i..].starts_with(if q == b'"' { b"\"\"\"" } else { b"'''" });
                let step = if triple { 3 } else { 1 };
                i += step;
                while i < bytes.len() {
                    if bytes[i] == b'\n' {
                        line += 1;
                        if !triple {
                            break;
                        }
                    }
                    if q == b'"' && bytes[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if bytes[i] == q && (!triple || bytes[i..].starts_with(&[q, q, q])) {
                        i += step;
                        break;
                    }
                    i += 1;
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Some(line);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_counted_outside_strings_and_comments() {
        assert_eq!(too_deep("a = [[1]]\n[b]\nc = { d = [1] }\n", 3), None);
        assert_eq!(too_deep("x = 1\na = [[[[1]]]]\n", 3), Some(2));
        assert_eq!(
            too_deep("a = \"[[[[[[\"\n# [[[[[[\nb = '''\n[[[[[\n'''\n", 3),
            None
        );
        assert_eq!(too_deep("a = \"\\\"[[[[\"\n", 3), None);
        assert_eq!(
            too_deep(&format!("a = {}", "[".repeat(100_000)), MAX_DEPTH),
            Some(1)
        );
    }

    #[test]
    fn devices_fifos_and_big_files_are_refused_not_read() {
        assert!(matches!(
            read_file(Path::new("/dev/zero"), MAX_BYTES),
            Err(ReadError::NotRegular("a character device"))
        ));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_file(dir.path(), MAX_BYTES),
            Err(ReadError::NotRegular("a directory"))
        ));
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; 2048]).unwrap();
        assert!(matches!(
            read_file(&big, 1024),
            Err(ReadError::TooLarge { limit: 1024 })
        ));
        assert_eq!(read_file(&big, 2048).unwrap().len(), 2048);
        assert_eq!(size(MAX_BYTES), "1 MiB");
    }
}
