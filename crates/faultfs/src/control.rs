//! The control socket: a unix socket taking one command per line and answering one JSON
//! line per command.
//!
//! ```text
//! cut drop          power cut: everything not durable is gone
//! cut torn SEED     power cut: a seeded random prefix of each unsynced op log survives
//! stats             {"ok":true,"files":..,"dirs":..,"bytes_live":..,"bytes_unsynced":..,"cuts":..}
//! ```
//! A cut needs every writer gone first (the harness SIGKILLs them): it waits up to
//! [`CUT_WAIT`] for the kernel to release their open files, and refuses otherwise.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::model::{CutMode, Model};

/// How long a cut waits for open files to be released.
pub const CUT_WAIT: Duration = Duration::from_secs(5);

/// Parses a command line into a cut mode (`None` for `stats`).
pub fn parse(line: &str) -> Result<Option<CutMode>, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["stats"] => Ok(None),
        ["cut", "drop"] => Ok(Some(CutMode::Drop)),
        ["cut", "torn", seed] => seed
            .parse()
            .map(|seed| Some(CutMode::Torn { seed }))
            .map_err(|_| format!("seed {seed:?} is not an unsigned integer")),
        _ => Err(format!("unknown command {line:?}; commands: `cut drop`, `cut torn SEED`, `stats`")),
    }
}

fn lock(model: &Mutex<Model>) -> std::sync::MutexGuard<'_, Model> {
    model.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs one command against the model and returns the JSON answer.
pub fn execute(model: &Mutex<Model>, line: &str) -> Value {
    let mode = match parse(line) {
        Ok(Some(mode)) => mode,
        Ok(None) => {
            let s = lock(model).stats();
            let mut v = serde_json::to_value(s).unwrap_or_default();
            v["ok"] = json!(true);
            return v;
        }
        Err(e) => return json!({ "ok": false, "error": e }),
    };
    let deadline = Instant::now() + CUT_WAIT;
    loop {
        let mut m = lock(model);
        let open = m.open_handles();
        if open == 0 {
            let report = m.cut(mode);
            let stats = m.stats();
            tracing::info!(?mode, ?report, "power cut");
            let mut v = serde_json::to_value(report).unwrap_or_default();
            v["ok"] = json!(true);
            v["mode"] = json!(match mode {
                CutMode::Drop => "drop".to_string(),
                CutMode::Torn { seed } => format!("torn {seed}"),
            });
            v["cuts"] = json!(stats.cuts);
            v["files"] = json!(stats.files);
            return v;
        }
        drop(m);
        if Instant::now() > deadline {
            return json!({
                "ok": false,
                "error": format!("{open} file(s) still open after {CUT_WAIT:?}: kill every process writing here before a cut"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve_conn(model: &Mutex<Model>, conn: UnixStream) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    for line in BufReader::new(conn).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let answer = execute(model, line.trim());
        writeln!(out, "{answer}")?;
    }
    Ok(())
}

/// Binds `path` (replacing a stale socket) and serves it on a background thread.
pub fn spawn(model: Arc<Mutex<Model>>, path: &Path) -> std::io::Result<()> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new().name("faultfs-control".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let model = model.clone();
            let _ = std::thread::Builder::new().name("faultfs-conn".into()).spawn(move || {
                if let Err(e) = serve_conn(&model, conn) {
                    tracing::debug!(error = %e, "control connection ended");
                }
            });
        }
    })?;
    Ok(())
}

/// Sends one command to a control socket and returns the answer (a client for tests and
/// harnesses).
pub fn send(path: &Path, command: &str) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(path)?;
    writeln!(s, "{command}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
