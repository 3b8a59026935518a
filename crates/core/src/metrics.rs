//! Prometheus metrics: a tiny text-format registry and an HTTP endpoint serving it.
//!
//! Metric names follow `hlstore_<component>_<thing>_<unit>`. Daemons build the page on
//! every scrape from their live counters (no background aggregation).

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Builds one Prometheus text-format page.
#[derive(Default)]
pub struct Page {
    out: String,
}

impl Page {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a metric family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    /// One sample; `labels` as (name, value) pairs.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// Builds the metrics page on each scrape.
pub type Render = Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// Whether a daemon is ready: `Err(why)` when not.
pub type Ready = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Serves `GET /metrics` (the page from `render`) and `GET /healthz` on `listener` until
/// `shutdown` resolves.
pub async fn serve(listener: TcpListener, render: Render, shutdown: impl Future<Output = ()>) {
    serve_with_ready(listener, render, None, shutdown).await
}

/// [`serve`], plus `GET /ready` from `ready`: `200 ready`, or `503` with the reason (a
/// Kubernetes readiness probe; `/healthz` stays the liveness answer).
pub async fn serve_with_ready(
    listener: TcpListener,
    render: Render,
    ready: Option<Ready>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (mut sock, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let render = render.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            // Read the request head (up to the blank line; requests may arrive in pieces).
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::time::timeout_at(deadline, sock.read(&mut buf[n..])).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(k)) => n += k,
                }
            }
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/metrics" => ("200 OK", render().await),
                "/healthz" => ("200 OK", "ok\n".to_string()),
                "/ready" if ready.is_some() => match ready.as_ref().map(|r| r()) {
                    Some(Err(why)) => ("503 Service Unavailable", format!("not ready: {why}\n")),
                    _ => ("200 OK", "ready\n".to_string()),
                },
                _ => ("404 Not Found", "not found: try /metrics or /healthz\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
