//! A tonic channel to a CSI socket (`unix:///path` or a plain path), as the CO's sidecars
//! use it. For tests and diagnostics.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::error::{CsiError, Result};

/// The socket path of a CSI endpoint (`unix:///path/csi.sock`, `unix:/path`, or `/path`).
pub fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let p = endpoint.strip_prefix("unix://").or_else(|| endpoint.strip_prefix("unix:")).unwrap_or(endpoint);
    if p.is_empty() || !p.starts_with('/') {
        return Err(CsiError::InvalidArgument(format!(
            "CSI endpoint {endpoint:?}: expected unix:///absolute/path/csi.sock"
        )));
    }
    Ok(PathBuf::from(p))
}

/// Connects to the CSI server listening on `endpoint`.
pub async fn connect(endpoint: &str) -> Result<Channel> {
    let path = socket_path(endpoint)?;
    Endpoint::from_static("http://csi.sock")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| CsiError::Internal(format!("connecting to {endpoint}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(socket_path("unix:///run/csi/csi.sock").unwrap(), PathBuf::from("/run/csi/csi.sock"));
        assert_eq!(socket_path("unix:/run/csi.sock").unwrap(), PathBuf::from("/run/csi.sock"));
        assert_eq!(socket_path("/run/csi.sock").unwrap(), PathBuf::from("/run/csi.sock"));
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://relative").is_err());
    }
}
