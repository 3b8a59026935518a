//! Prometheus metrics of the CSI driver: every gRPC call counted by method and gRPC code,
//! with its total duration and a latency histogram per method, recorded by a tower layer
//! around the server (so no RPC can be missed). Served on `--metrics-listen` by the
//! engine's `/metrics` endpoint; the Grafana dashboard's CSI row reads them.
//!
//! The code is the `grpc-status` of the response head: tonic puts it there for errors
//! (trailers-only responses); a response without it is a success (code 0).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use hlstore_core::metrics::Page;
use tonic::codegen::http;

/// Upper bounds (seconds) of the latency histogram's buckets: from a cached answer to a
/// call at the sidecars' timeouts (CreateVolume of a clone runs up to minutes).
pub const LATENCY_BUCKETS: [f64; 10] = [0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 10.0, 30.0, 150.0];

/// Calls and seconds per (method, gRPC code), and a latency histogram per method.
#[derive(Debug, Default)]
pub struct CsiMetrics {
    calls: Mutex<BTreeMap<(String, i32), (u64, f64)>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
}

/// Calls per bucket of [`LATENCY_BUCKETS`] (not cumulative; the last is +Inf).
#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl CsiMetrics {
    pub fn record(&self, method: &str, code: i32, seconds: f64) {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let e = calls.entry((method.to_string(), code)).or_default();
        e.0 += 1;
        e.1 += seconds;
        drop(calls);
        let mut lat = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = lat.entry(method.to_string()).or_default();
        let i = LATENCY_BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(LATENCY_BUCKETS.len());
        h.buckets[i] += 1;
        h.sum += seconds;
        h.count += 1;
    }

    /// The metrics page.
    pub fn render(&self) -> String {
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut p = Page::new();
        p.family("hlstore_csi_calls_total", "counter", "CSI calls by method and gRPC status code");
        for ((method, code), (n, _)) in &calls {
            let code = code.to_string();
            p.sample("hlstore_csi_calls_total", &[("method", method), ("code", &code)], *n as f64);
        }
        p.family("hlstore_csi_call_seconds_total", "counter", "Time spent in CSI calls by method");
        let mut by_method: BTreeMap<&str, f64> = BTreeMap::new();
        for ((method, _), (_, secs)) in &calls {
            *by_method.entry(method).or_default() += secs;
        }
        for (method, secs) in by_method {
            p.sample("hlstore_csi_call_seconds_total", &[("method", method)], secs);
        }
        let h = "hlstore_csi_call_duration_seconds";
        p.family(h, "histogram", "CSI call latency by method, until the answer is ready");
        let (bucket, sum, count) = (format!("{h}_bucket"), format!("{h}_sum"), format!("{h}_count"));
        let latency = self.latency.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (method, hist) in &latency {
            let mut cumulative = 0;
            for (i, n) in hist.buckets.iter().enumerate() {
                cumulative += n;
                let le = LATENCY_BUCKETS.get(i).map(|b| b.to_string()).unwrap_or_else(|| "+Inf".into());
                p.sample(&bucket, &[("method", method), ("le", &le)], cumulative as f64);
            }
            p.sample(&sum, &[("method", method)], hist.sum);
            p.sample(&count, &[("method", method)], hist.count as f64);
        }
        p.single("hlstore_csi_up", "gauge", "1 while the CSI driver serves", 1.0);
        p.finish()
    }
}

/// The tower layer that records every call into a [`CsiMetrics`].
#[derive(Debug, Clone)]
pub struct MetricsLayer(pub Arc<CsiMetrics>);

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetricsService { inner, metrics: self.0.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<CsiMetrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or_default().to_string();
        let metrics = self.metrics.clone();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            if let Ok(r) = &res {
                let code = r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                metrics.record(&method, code, start.elapsed().as_secs_f64());
            }
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_counts_calls_by_method_and_code() {
        let m = CsiMetrics::default();
        m.record("CreateVolume", 0, 0.5);
        m.record("CreateVolume", 0, 0.25);
        m.record("CreateVolume", 6, 0.1);
        let page = m.render();
        assert!(page.contains(r#"hlstore_csi_calls_total{method="CreateVolume",code="0"} 2"#), "{page}");
        assert!(page.contains(r#"hlstore_csi_calls_total{method="CreateVolume",code="6"} 1"#), "{page}");
        assert!(page.contains(r#"hlstore_csi_call_seconds_total{method="CreateVolume"} 0.85"#), "{page}");
        // 0.1 s falls in the 0.1 bucket, 0.25 in 0.5, 0.5 in 0.5: cumulative counts.
        assert!(
            page.contains(r#"hlstore_csi_call_duration_seconds_bucket{method="CreateVolume",le="0.025"} 0"#),
            "{page}"
        );
        assert!(
            page.contains(r#"hlstore_csi_call_duration_seconds_bucket{method="CreateVolume",le="0.1"} 1"#),
            "{page}"
        );
        assert!(
            page.contains(r#"hlstore_csi_call_duration_seconds_bucket{method="CreateVolume",le="0.5"} 3"#),
            "{page}"
        );
        assert!(
            page.contains(r#"hlstore_csi_call_duration_seconds_bucket{method="CreateVolume",le="+Inf"} 3"#),
            "{page}"
        );
        assert!(page.contains(r#"hlstore_csi_call_duration_seconds_count{method="CreateVolume"} 3"#), "{page}");
        assert!(page.contains("# TYPE hlstore_csi_call_duration_seconds histogram"), "{page}");
    }
}
