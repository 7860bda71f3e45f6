//! The `aws cloudformation` commands of a README, run against the templates
//! as CloudFormation would take them.
//!
//! The shell blocks are read by a deliberately small shell: assignments,
//! `$var`/`${var}`, quotes, `\` continuations, `;`, functions with `$1…`
//! and `$(…)` (whose commands are checked too; their output is a
//! placeholder). Anything else (pipes, redirections, `&&`) is refused so
//! the documented commands stay checkable.
//!
//! What CloudFormation refuses, and the check that mirrors it (AWS CLI
//! `cloudformation deploy` and the CloudFormation API reference):
//! - a template file that does not exist;
//! - `--parameter-overrides` naming a parameter the template does not
//!   declare ("Parameters: [X] do not exist in the template"), or a value
//!   outside its AllowedValues;
//! - a create without a value for a parameter that has no Default ("Parameters:
//!   [X] must have values"); an update keeps the previous values of the
//!   parameters it does not name (`deploy` passes UsePreviousValue for them,
//!   and a parameter new to the template takes its Default: aws/aws-cli#2599);
//! - IAM resources without `--capabilities CAPABILITY_IAM`, or IAM resources
//!   with custom names without `CAPABILITY_NAMED_IAM` (InsufficientCapabilities);
//! - a template Rule whose assertion fails;
//! - `Fn::ImportValue` of a name no live stack exports ("No export named X
//!   found"), and an export name another live stack already exports;
//! - `delete-stack` of a stack whose exports another stack imports ("Export
//!   X cannot be deleted as it is in use by Y");
//! - `update-stack` (UpdateStack API): exactly one of `--template-body` and
//!   `--use-previous-template`; a parameter not named in `--parameters`
//!   takes its Default (not its previous value; API reference, Parameter),
//!   so one without a Default must be named; `UsePreviousValue=true` only for
//!   a parameter the stack has; a parameter the template does not declare;
//! - resources with deletion protection: a delete fails, and so does the
//!   rollback of a failed first create (ROLLBACK_FAILED); a resource the
//!   delete keeps (`Retain`, `RetainExceptOnCreate`) does not stop it.
//!
//! And what a teardown must not do (the update right before a
//! `delete-stack`): upload the local template (`deploy`, `--template-body`),
//! which rolls the control planes first if it differs from the deployed one,
//! or turn off the deletion protection of a resource the delete keeps.
//! - stack tags are propagated to the Auto Scaling groups and on to their
//!   instances, whose tags are in IMDS: EC2 refuses keys with `/` or spaces.

use super::{scalar, Stack};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// One simple command, after expansion.
#[derive(Debug, Clone)]
pub struct Command {
    pub argv: Vec<String>,
    /// Whether each word holds a `$(…)` output (unknown until run).
    pub dynamic: Vec<bool>,
    /// The command as written (for messages).
    pub text: String,
}

/// The bodies of the ```sh blocks of `markdown`, in order.
pub fn sh_blocks(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        let fence = line.trim_start();
        match &mut current {
            None if fence == "```sh" || fence == "```bash" => current = Some(String::new()),
            Some(block) if fence == "```" => {
                out.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    out
}

/// A tiny shell's state: variables and functions, across blocks.
#[derive(Default)]
pub struct Shell {
    vars: BTreeMap<String, String>,
    functions: BTreeMap<String, String>,
}

impl Shell {
    /// The simple commands `script` runs, in order (`$(…)` first).
    pub fn run(&mut self, script: &str) -> Result<Vec<Command>, String> {
        let mut out = Vec::new();
        let joined = script.replace("\\\n", " ");
        for line in joined.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((name, body)) = function_definition(line) {
                self.functions.insert(name, body);
                continue;
            }
            for segment in split_unquoted(line, ';')? {
                let segment = segment.trim();
                if segment.is_empty() {
                    continue;
                }
                self.simple(segment, &mut out)?;
            }
        }
        Ok(out)
    }

    fn simple(&mut self, text: &str, out: &mut Vec<Command>) -> Result<(), String> {
        let (argv, dynamic) = self.words(text, out)?;
        if argv.is_empty() {
            return Ok(());
        }
        let is_assignment = |w: &String| {
            w.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        };
        if argv.iter().all(is_assignment) {
            for w in argv {
                let (k, v) = w.split_once('=').expect("assignment");
                self.vars.insert(k.to_string(), v.to_string());
            }
            return Ok(());
        }
        if let Some(body) = self.functions.get(&argv[0]).cloned() {
            let mut expanded = body;
            for (i, a) in argv.iter().enumerate().skip(1).rev() {
                expanded = expanded.replace(&format!("${i}"), a);
            }
            let inner = self.run(&expanded)?;
            out.extend(inner);
            return Ok(());
        }
        out.push(Command {
            argv,
            dynamic,
            text: text.to_string(),
        });
        Ok(())
    }

    /// Splits into words, expanding variables and `$(…)`.
    fn words(
        &mut self,
        text: &str,
        out: &mut Vec<Command>,
    ) -> Result<(Vec<String>, Vec<bool>), String> {
        let chars: Vec<char> = text.chars().collect();
        let mut words = Vec::new();
        let mut dynamic = Vec::new();
        let mut word = String::new();
        let mut in_word = false;
        let mut is_dynamic = false;
        let mut quote: Option<char> = None;
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            match (quote, c) {
                (Some('\''), '\'') | (Some('"'), '"') => quote = None,
                (Some('\''), _) => word.push(c),
                (None, '\'') | (None, '"') => {
                    quote = Some(c);
                    in_word = true;
                }
                (None, c) if c.is_whitespace() => {
                    if in_word {
                        words.push(std::mem::take(&mut word));
                        dynamic.push(is_dynamic);
                    }
                    in_word = false;
                    is_dynamic = false;
                }
                (None, '|' | '&' | '<' | '>' | '`') => {
                    return Err(format!("unsupported shell syntax {c:?} in: {text}"))
                }
                (_, '$') => {
                    in_word = true;
                    let rest: String = chars[i + 1..].iter().collect();
                    if let Some(inner) = rest.strip_prefix('(') {
                        let end = matching_paren(inner)
                            .ok_or_else(|| format!("unterminated $( in: {text}"))?;
                        let command = &inner[..end];
                        let ran = self.run(command)?;
                        out.extend(ran);
                        word.push_str(&format!("<output of {command}>"));
                        is_dynamic = true;
                        i += 2 + end + 1;
                        continue;
                    }
                    let (name, used) = if let Some(braced) = rest.strip_prefix('{') {
                        let end = braced
                            .find('}')
                            .ok_or_else(|| format!("unterminated ${{ in: {text}"))?;
                        (braced[..end].to_string(), end + 2)
                    } else {
                        let name: String = rest
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        let n = name.len();
                        (name, n)
                    };
                    if name.is_empty() {
                        word.push('$');
                    } else {
                        let value = self
                            .vars
                            .get(&name)
                            .ok_or_else(|| format!("${name} is not set in: {text}"))?;
                        word.push_str(value);
                    }
                    i += 1 + used;
                    continue;
                }
                (_, '\\') if quote != Some('\'') && i + 1 < chars.len() => {
                    word.push(chars[i + 1]);
                    i += 1;
                }
                _ => {
                    word.push(c);
                    in_word = true;
                }
            }
            i += 1;
        }
        if quote.is_some() {
            return Err(format!("unterminated quote in: {text}"));
        }
        if in_word {
            words.push(word);
            dynamic.push(is_dynamic);
        }
        Ok((words, dynamic))
    }
}

/// `name() { body; }` on one line.
fn function_definition(line: &str) -> Option<(String, String)> {
    let (name, rest) = line.split_once("()")?;
    let name = name.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let body = rest
        .trim()
        .strip_prefix('{')?
        .trim_end()
        .strip_suffix('}')?;
    Some((
        name.to_string(),
        body.trim().trim_end_matches(';').to_string(),
    ))
}

fn split_unquoted(line: &str, sep: char) -> Result<Vec<String>, String> {
    let mut out = vec![String::new()];
    let mut quote: Option<char> = None;
    let mut depth = 0usize;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (None, '\'' | '"') => quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') => depth = depth.saturating_sub(1),
            (None, c) if c == sep && depth == 0 => {
                out.push(String::new());
                continue;
            }
            _ => {}
        }
        out.last_mut().expect("segment").push(c);
    }
    if quote.is_some() {
        return Err(format!("unterminated quote in: {line}"));
    }
    Ok(out)
}

fn matching_paren(text: &str) -> Option<usize> {
    let mut depth = 1usize;
    let mut quote: Option<char> = None;
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// A stack the commands made.
struct Deployed {
    file: String,
    template: Value,
    params: BTreeMap<String, String>,
    live: bool,
    /// The last update of the stack (none since its create): a
    /// `delete-stack` right after it (waits aside) makes it the teardown's.
    last_update: Option<Update>,
}

/// What an update did that matters to a teardown.
struct Update {
    /// The command, for messages.
    text: String,
    /// The local template it uploaded (`deploy --template-file`,
    /// `update-stack --template-body`); `None` for `--use-previous-template`.
    local_template: Option<String>,
    /// Resources kept on delete (`Retain`, `RetainExceptOnCreate`) whose
    /// deletion protection the update turned off.
    unprotected: Vec<String>,
}

/// Every refusal CloudFormation would answer `commands` with, run in order
/// from the repository root `root`.
pub fn problems(root: &Path, commands: &[Command]) -> Vec<String> {
    let mut p = Vec::new();
    let mut stacks: BTreeMap<String, Deployed> = BTreeMap::new();
    // The stack the last command (waits aside) updated: a delete-stack of
    // it right after makes that update the teardown's.
    let mut just_updated: Option<String> = None;
    for c in commands {
        if c.argv.first().map(String::as_str) != Some("aws")
            || c.argv.get(1).map(String::as_str) != Some("cloudformation")
        {
            continue;
        }
        let sub = c.argv.get(2).cloned().unwrap_or_default();
        let flags = match flags(c) {
            Ok(f) => f,
            Err(e) => {
                p.push(e);
                continue;
            }
        };
        let one = |k: &str| flags.get(k).and_then(|v| v.first()).cloned();
        let Some(name) = one("--stack-name") else {
            p.push(format!("no --stack-name: {}", c.text));
            continue;
        };
        let teardown = if sub == "wait" {
            None
        } else {
            just_updated
                .take()
                .filter(|n| *n == name && sub == "delete-stack")
        };
        match sub.as_str() {
            "deploy" | "update-stack" => {
                let before = stacks.get(&name).filter(|s| s.live).is_some();
                if sub == "deploy" {
                    deploy(root, c, &flags, &name, &mut stacks, &mut p);
                } else {
                    update_stack(root, c, &flags, &name, &mut stacks, &mut p);
                }
                if before {
                    just_updated = Some(name.clone());
                }
            }
            "describe-stacks" => {
                let Some(s) = stacks.get(&name).filter(|s| s.live) else {
                    p.push(format!(
                        "describe-stacks {name}: no such stack was deployed"
                    ));
                    continue;
                };
                let query = one("--query").unwrap_or_default();
                let mut rest = query.as_str();
                while let Some(i) = rest.find("OutputKey==") {
                    let after = &rest[i + "OutputKey==".len()..];
                    let key: String = after
                        .trim_start_matches(['\'', '`'])
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric())
                        .collect();
                    if s.template["Outputs"].get(&key).is_none() {
                        p.push(format!(
                            "describe-stacks {name} reads output {key}, which {} does not declare",
                            s.file
                        ));
                    }
                    rest = after;
                }
            }
            "delete-stack" => {
                let Some(s) = stacks.get(&name).filter(|s| s.live) else {
                    p.push(format!("delete-stack {name}: no such stack was deployed"));
                    continue;
                };
                if let Some(u) = s.last_update.as_ref().filter(|_| teardown.is_some()) {
                    if let Some(f) = &u.local_template {
                        p.push(format!(
                            "delete-stack {name}: the teardown's update uploads the local template {f} ({}): if it differs from the deployed one, the update first rolls every control plane (up to PauseTime each) and may roll back before the delete; update with --use-previous-template",
                            u.text
                        ));
                    }
                    for r in &u.unprotected {
                        p.push(format!(
                            "delete-stack {name}: the teardown's update turns off {r}'s deletion protection, but the delete keeps {r} (its DeletionPolicy retains it): it outlives the stack unprotected ({})",
                            u.text
                        ));
                    }
                }
                if let Some(stack) = evaluable(s, &stacks, &name) {
                    let exports = stack.exports();
                    for (other, o) in stacks.iter().filter(|(n, o)| o.live && **n != name) {
                        if let Some(stack) = evaluable(o, &stacks, other) {
                            for i in stack
                                .import_names()
                                .intersection(&exports.keys().cloned().collect())
                            {
                                p.push(format!("delete-stack {name}: export {i} cannot be deleted as it is in use by {other}"));
                            }
                        }
                    }
                    // A retained resource is not deleted, so its protection
                    // does not stop the delete.
                    for r in protected(&stack)
                        .into_iter()
                        .filter(|r| !retained(&stack, r))
                    {
                        p.push(format!("delete-stack {name}: {r} has deletion protection on; the delete fails (turn it off with a stack update first)"));
                    }
                }
                if let Some(s) = stacks.get_mut(&name) {
                    s.live = false;
                }
            }
            "wait" => {
                let what = c.argv.get(3).cloned().unwrap_or_default();
                if ![
                    "stack-create-complete",
                    "stack-update-complete",
                    "stack-delete-complete",
                ]
                .contains(&what.as_str())
                {
                    p.push(format!("wait {what}: not checked by this test"));
                }
                if !stacks.contains_key(&name) {
                    p.push(format!("wait {what} {name}: no such stack was deployed"));
                }
            }
            other => p.push(format!(
                "aws cloudformation {other} is not checked by this test: add a check ({})",
                c.text
            )),
        }
    }
    p
}

/// The flags of a `aws cloudformation <sub>` command, each with its values.
fn flags(c: &Command) -> Result<BTreeMap<String, Vec<String>>, String> {
    const VALUED: &[&str] = &[
        "--stack-name",
        "--template-file",
        "--parameter-overrides",
        "--capabilities",
        "--tags",
        "--query",
        "--output",
        "--region",
        "--parameters",
        "--template-body",
    ];
    const SWITCHES: &[&str] = &["--no-fail-on-empty-changeset", "--use-previous-template"];
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let start = if c.argv.get(2).map(String::as_str) == Some("wait") {
        4
    } else {
        3
    };
    for w in c.argv.iter().skip(start) {
        if w.starts_with("--") {
            if SWITCHES.contains(&w.as_str()) {
                out.entry(w.clone()).or_default();
                current = None;
            } else if VALUED.contains(&w.as_str()) {
                out.entry(w.clone()).or_default();
                current = Some(w.clone());
            } else {
                return Err(format!("{w} is not checked by this test: {}", c.text));
            }
        } else if let Some(k) = &current {
            out.entry(k.clone()).or_default().push(w.clone());
        } else {
            return Err(format!("stray word {w:?} in: {}", c.text));
        }
    }
    Ok(out)
}

fn deploy(
    root: &Path,
    c: &Command,
    flags: &BTreeMap<String, Vec<String>>,
    name: &str,
    stacks: &mut BTreeMap<String, Deployed>,
    p: &mut Vec<String>,
) {
    let Some(file) = flags
        .get("--template-file")
        .and_then(|v| v.first())
        .cloned()
    else {
        p.push(format!("deploy {name}: no --template-file"));
        return;
    };
    let Some(template) = read_template(root, &file, "deploy", name, p) else {
        return;
    };
    let declared = template["Parameters"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let previous = stacks.get(name).filter(|s| s.live);
    // `deploy` keeps the previous value of every parameter it does not
    // name (aws/aws-cli#2599).
    let mut params: BTreeMap<String, String> =
        previous.map(|s| s.params.clone()).unwrap_or_default();
    let overrides = flags
        .get("--parameter-overrides")
        .cloned()
        .unwrap_or_default();
    let dynamic = dynamic_words(c);
    for o in &overrides {
        let Some((k, v)) = o.split_once('=') else {
            p.push(format!(
                "deploy {name}: parameter override {o:?} is not Key=Value"
            ));
            continue;
        };
        let Some(decl) = declared.get(k) else {
            p.push(format!(
                "deploy {name}: Parameters: [{k}] do not exist in the template {file}"
            ));
            continue;
        };
        if !dynamic.contains(o) {
            allowed(decl, k, v, "deploy", name, p);
        }
        params.insert(k.to_string(), v.to_string());
    }
    for (k, decl) in &declared {
        if decl.get("Default").is_none() && !params.contains_key(k) {
            p.push(format!(
                "deploy {name}: Parameters: [{k}] must have values ({file} gives it no Default)"
            ));
        }
    }
    apply(
        c,
        flags,
        name,
        Deployed {
            file: file.clone(),
            template,
            params,
            live: true,
            last_update: None,
        },
        Some(file),
        stacks,
        p,
    );
}

/// `aws cloudformation update-stack` (CloudFormation's UpdateStack API):
/// one of `--use-previous-template` (the template the stack was last
/// deployed with) or `--template-body file://…`; every parameter it does
/// not name in `--parameters` takes the template's Default, not its
/// previous value ("If you don't specify a key and value for a particular
/// parameter, CloudFormation uses the default value that's specified in
/// your template", API reference, Parameter), and one without a Default
/// must be named; `UsePreviousValue=true` keeps the stack's value and needs
/// a parameter the stack already has.
fn update_stack(
    root: &Path,
    c: &Command,
    flags: &BTreeMap<String, Vec<String>>,
    name: &str,
    stacks: &mut BTreeMap<String, Deployed>,
    p: &mut Vec<String>,
) {
    let Some(previous) = stacks.get(name).filter(|s| s.live) else {
        p.push(format!(
            "update-stack {name}: Stack with id {name} does not exist"
        ));
        return;
    };
    let body = flags
        .get("--template-body")
        .and_then(|v| v.first())
        .cloned();
    let reuse = flags.contains_key("--use-previous-template");
    let (file, template, local) = match (body, reuse) {
        (Some(b), false) => {
            let Some(file) = b.strip_prefix("file://").map(String::from) else {
                p.push(format!(
                    "update-stack {name}: --template-body {b:?} is not file://<path> (not checked by this test)"
                ));
                return;
            };
            let Some(t) = read_template(root, &file, "update-stack", name, p) else {
                return;
            };
            (file.clone(), t, Some(file))
        }
        (None, true) => (previous.file.clone(), previous.template.clone(), None),
        _ => {
            p.push(format!(
                "update-stack {name}: give exactly one of --template-body, --use-previous-template ({})",
                c.text
            ));
            return;
        }
    };
    let declared = template["Parameters"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let before = previous.template["Parameters"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    for word in flags.get("--parameters").cloned().unwrap_or_default() {
        let mut key = None;
        let mut value = None;
        let mut keep = false;
        for field in word.split(',') {
            match field.split_once('=') {
                Some(("ParameterKey", k)) => key = Some(k.to_string()),
                Some(("ParameterValue", v)) => value = Some(v.to_string()),
                Some(("UsePreviousValue", "true")) => keep = true,
                Some(("UsePreviousValue", "false")) => {}
                _ => p.push(format!(
                    "update-stack {name}: --parameters field {field:?} is not checked by this test ({word})"
                )),
            }
        }
        let Some(k) = key else {
            p.push(format!("update-stack {name}: {word:?} has no ParameterKey"));
            continue;
        };
        let Some(decl) = declared.get(&k) else {
            p.push(format!(
                "update-stack {name}: Parameters: [{k}] do not exist in the template {file}"
            ));
            continue;
        };
        match (value, keep) {
            (Some(_), true) | (None, false) => p.push(format!(
                "update-stack {name}: {k}: give either ParameterValue or UsePreviousValue=true ({word})"
            )),
            (Some(v), false) => {
                allowed(decl, &k, &v, "update-stack", name, p);
                params.insert(k, v);
            }
            (None, true) => {
                let old = previous.params.get(&k).cloned().or_else(|| {
                    before
                        .get(&k)
                        .and_then(|d| d.get("Default"))
                        .map(scalar)
                });
                match old {
                    Some(v) if before.contains_key(&k) => {
                        params.insert(k, v);
                    }
                    _ => p.push(format!(
                        "update-stack {name}: Invalid input for parameter key {k}: UsePreviousValue for a parameter the stack does not have"
                    )),
                }
            }
        }
    }
    for (k, decl) in &declared {
        if params.contains_key(k) {
            continue;
        }
        match decl.get("Default") {
            Some(d) => {
                params.insert(k.clone(), scalar(d));
            }
            None => p.push(format!(
                "update-stack {name}: Parameters: [{k}] must have values (not named: an update takes the Default, and {file} gives it none; UsePreviousValue=true keeps the stack's)"
            )),
        }
    }
    apply(
        c,
        flags,
        name,
        Deployed {
            file,
            template,
            params,
            live: true,
            last_update: None,
        },
        local,
        stacks,
        p,
    );
}

fn read_template(
    root: &Path,
    file: &str,
    verb: &str,
    name: &str,
    p: &mut Vec<String>,
) -> Option<Value> {
    let text = match std::fs::read_to_string(root.join(file)) {
        Ok(t) => t,
        Err(e) => {
            p.push(format!("{verb} {name}: template {file}: {e}"));
            return None;
        }
    };
    match serde_json::from_str(&text) {
        Ok(t) => Some(t),
        Err(e) => {
            p.push(format!("{verb} {name}: {file} is not JSON: {e}"));
            None
        }
    }
}

/// The words of `c` that hold a `$(…)` output.
fn dynamic_words(c: &Command) -> BTreeSet<String> {
    c.argv
        .iter()
        .zip(&c.dynamic)
        .filter(|(_, d)| **d)
        .map(|(w, _)| w.clone())
        .collect()
}

/// A value outside the parameter's AllowedValues.
fn allowed(decl: &Value, k: &str, v: &str, verb: &str, name: &str, p: &mut Vec<String>) {
    if let Some(allowed) = decl["AllowedValues"].as_array() {
        if !allowed.iter().any(|a| scalar(a) == v) {
            p.push(format!("{verb} {name}: {k}={v} is not one of {allowed:?}"));
        }
    }
}

/// Creates or updates stack `name` to `entry`: capabilities, stack tags,
/// rules, imports and exports, protection on create; and records what an
/// update did for a teardown that follows it.
fn apply(
    c: &Command,
    flags: &BTreeMap<String, Vec<String>>,
    name: &str,
    mut entry: Deployed,
    local_template: Option<String>,
    stacks: &mut BTreeMap<String, Deployed>,
    p: &mut Vec<String>,
) {
    let verb = c.argv.get(2).cloned().unwrap_or_default();
    let file = entry.file.clone();
    let template = &entry.template;
    let previous = stacks.get(name).filter(|s| s.live);
    let creating = previous.is_none();
    // Capabilities: any IAM resource needs CAPABILITY_IAM; one with a
    // custom name CAPABILITY_NAMED_IAM.
    let caps: BTreeSet<String> = flags
        .get("--capabilities")
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .collect();
    const NAME_PROPS: &[&str] = &[
        "RoleName",
        "InstanceProfileName",
        "ManagedPolicyName",
        "UserName",
        "GroupName",
    ];
    let mut iam = false;
    let mut named = false;
    for (_, r) in template["Resources"].as_object().into_iter().flatten() {
        if scalar(&r["Type"]).starts_with("AWS::IAM::") {
            iam = true;
            named |= NAME_PROPS.iter().any(|n| r["Properties"].get(*n).is_some());
        }
    }
    if named && !caps.contains("CAPABILITY_NAMED_IAM") {
        p.push(format!(
            "{verb} {name}: InsufficientCapabilities: {file} has named IAM resources, --capabilities CAPABILITY_NAMED_IAM is missing"
        ));
    } else if iam && !caps.contains("CAPABILITY_IAM") && !caps.contains("CAPABILITY_NAMED_IAM") {
        p.push(format!(
            "{verb} {name}: InsufficientCapabilities: {file} creates IAM resources, --capabilities CAPABILITY_IAM is missing"
        ));
    }
    for t in flags.get("--tags").cloned().unwrap_or_default() {
        let key = t.split_once('=').map(|(k, _)| k).unwrap_or(&t);
        if key.contains('/') || key.chars().any(char::is_whitespace) {
            p.push(format!(
                "{verb} {name}: stack tag {key:?} is propagated to instances, whose tags are in IMDS: EC2 refuses '/' and spaces there"
            ));
        }
    }
    let old = previous.and_then(|s| evaluable(s, stacks, name));
    let before: Vec<String> = old.as_ref().map(protected).unwrap_or_default();
    let stack = Stack::new(entry.template.clone(), &[]);
    let stack = Stack {
        params: stack
            .params
            .into_iter()
            .chain(entry.params.clone())
            .collect(),
        ..stack
    };
    let mut unprotected = Vec::new();
    if complete(&stack) {
        for f in stack.rule_failures() {
            p.push(format!("{verb} {name}: rule {f}"));
        }
        let available = exports_except(stacks, name);
        let mut resolvable = true;
        for i in stack.import_names() {
            if !available.contains_key(&i) {
                p.push(format!(
                    "{verb} {name}: No export named {i} found (Fn::ImportValue in {file})"
                ));
                resolvable = false;
            }
        }
        if resolvable {
            let stack = stack.importing(available.clone());
            for e in stack.exports().keys() {
                if available.contains_key(e) {
                    p.push(format!(
                        "{verb} {name}: export {e} is already exported by another stack"
                    ));
                }
            }
            // A subnet's AvailabilityZone cannot change in place: the
            // update replaces it, which fails while instances, endpoints or
            // a load balancer use it (AWS::EC2::Subnet: "Update requires:
            // Replacement").
            if let Some(old) = &old {
                for id in stack.of_type("AWS::EC2::Subnet") {
                    if !old.resources().contains_key(&id) {
                        continue;
                    }
                    let was = scalar(&old.prop(&id, "AvailabilityZone"));
                    let now = scalar(&stack.prop(&id, "AvailabilityZone"));
                    if was != now {
                        p.push(format!(
                            "{verb} {name}: moves {id} from {was} to {now}: CloudFormation replaces the subnet, which fails while the cluster uses it (give the AZs its subnets are in)"
                        ));
                    }
                }
            }
            let after = protected(&stack);
            if creating {
                for r in &after {
                    p.push(format!(
                        "{verb} {name}: creates {r} with deletion protection on: a failed create cannot roll it back (ROLLBACK_FAILED); create with protection off, then turn it on with an update"
                    ));
                }
            }
            unprotected = before
                .into_iter()
                .filter(|r| !after.contains(r) && retained(&stack, r))
                .collect();
        }
    }
    if !creating {
        entry.last_update = Some(Update {
            text: c.text.split_whitespace().collect::<Vec<_>>().join(" "),
            local_template,
            unprotected,
        });
    }
    stacks.insert(name.to_string(), entry);
}

/// Whether a stack delete keeps resource `id` (`DeletionPolicy` `Retain`,
/// or `RetainExceptOnCreate` once the create has completed).
fn retained(stack: &Stack, id: &str) -> bool {
    matches!(
        scalar(&stack.resource(id)["DeletionPolicy"]).as_str(),
        "Retain" | "RetainExceptOnCreate"
    )
}

/// Whether every parameter has a value (else the stack was refused).
fn complete(stack: &Stack) -> bool {
    stack.template["Parameters"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, _)| stack.params.contains_key(k))
}

/// The exports of every live stack but `except`.
fn exports_except(stacks: &BTreeMap<String, Deployed>, except: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    // Exporters first: a stack's own imports need the others' exports.
    for _ in 0..2 {
        for (n, s) in stacks.iter().filter(|(n, s)| s.live && *n != except) {
            if let Some(stack) = evaluable(s, stacks, n) {
                out.extend(stack.exports());
            }
        }
    }
    out
}

/// The deployed stack with its imports resolved, if they all are.
fn evaluable(s: &Deployed, stacks: &BTreeMap<String, Deployed>, name: &str) -> Option<Stack> {
    let stack = Stack::new(s.template.clone(), &[]);
    let stack = Stack {
        params: stack.params.into_iter().chain(s.params.clone()).collect(),
        ..stack
    };
    if !complete(&stack) {
        return None;
    }
    let needed = stack.import_names();
    if needed.is_empty() {
        return Some(stack);
    }
    let mut available = BTreeMap::new();
    for (n, o) in stacks.iter().filter(|(n, o)| o.live && n.as_str() != name) {
        let other = Stack::new(o.template.clone(), &[]);
        let other = Stack {
            params: other.params.into_iter().chain(o.params.clone()).collect(),
            ..other
        };
        // One level of imports: an exporter that imports itself is not
        // modelled (the templates here do not chain).
        if complete(&other) && other.import_names().is_empty() {
            available.extend(other.exports());
        } else {
            let _ = n;
        }
    }
    if needed.iter().all(|n| available.contains_key(n)) {
        Some(stack.importing(available))
    } else {
        None
    }
}

/// The resources of `stack` whose deletion protection is on.
pub fn protected(stack: &Stack) -> Vec<String> {
    let mut out = Vec::new();
    for (id, r) in stack.resources() {
        if r.get("Condition")
            .is_some_and(|c| !stack.condition(&scalar(c)))
        {
            continue;
        }
        let props = stack.eval(&r["Properties"]);
        let on = |v: &Value| scalar(v) == "true";
        let lb = props["LoadBalancerAttributes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["Key"] == "deletion_protection.enabled" && on(&a["Value"]));
        if lb || on(&props["DeletionProtectionEnabled"]) || on(&props["DeletionProtection"]) {
            out.push(id.clone());
        }
    }
    out
}
