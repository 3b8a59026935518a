//! Kernel NBD devices configured over generic netlink.
//!
//! Attach: connect to the volume's NBD export, run the handshake in userspace (the
//! engine's `negotiate`), then hand the socket to the kernel with NBD_CMD_CONNECT, with
//! the request timeout, the dead-connection timeout and the volume id as backend
//! identifier. The kernel picks a free `/dev/nbdN` and frees it on disconnect.
//! Find: `/sys/block/nbd*/backend` equals the volume id and `/sys/block/nbdN/pid` exists.
//! Resize: NBD_CMD_RECONFIGURE with the export's new size (read by a fresh handshake).
//!
//! The engine serving the export (the node agent) sets `PR_SET_IO_FLUSHER`; see
//! [`super::set_io_flusher`].

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hlstore_nbd_client::handshake::negotiate;
use hlstore_nbd_client::{NbdAddress, NbdUri};

use super::netlink::{self, ConnectConfig, Reply};
use super::Attacher;
use crate::error::{CsiError, Result};

/// Timeouts and geometry of the kernel devices.
#[derive(Debug, Clone, Copy)]
pub struct NbdSettings {
    /// A request not answered within this is failed (and the connection considered dead).
    pub timeout_secs: u64,
    /// A device whose connections died waits this long for a reconfigure before failing I/O.
    pub dead_conn_timeout_secs: u64,
    pub block_size: u64,
}

impl Default for NbdSettings {
    fn default() -> Self {
        Self { timeout_secs: 30, dead_conn_timeout_secs: 120, block_size: 4096 }
    }
}

pub struct NbdAttacher {
    settings: NbdSettings,
    seq: AtomicU32,
}

/// How long to wait for a netlink answer.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the NBD export's handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

impl NbdAttacher {
    pub fn new(settings: NbdSettings) -> Self {
        Self { settings, seq: AtomicU32::new(1) }
    }

    fn require_module() -> Result<()> {
        if Path::new("/sys/module/nbd").exists() {
            Ok(())
        } else {
            Err(CsiError::FailedPrecondition(
                "the kernel has no NBD module loaded (modprobe nbd), or run the node plugin with --attach loop".into(),
            ))
        }
    }

    /// Index of the connected device whose backend identifier is `volume_id`.
    fn find_index(volume_id: &str) -> Option<u32> {
        let rd = std::fs::read_dir("/sys/block").ok()?;
        rd.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let index: u32 = name.strip_prefix("nbd")?.parse().ok()?;
            let backend = std::fs::read_to_string(e.path().join("backend")).ok()?;
            (backend.trim_end() == volume_id && e.path().join("pid").exists()).then_some(index)
        })
    }

    /// Index of the device of `volume_id` that lost its connection (no pid).
    fn dead_index(volume_id: &str) -> Option<u32> {
        let rd = std::fs::read_dir("/sys/block").ok()?;
        rd.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let index: u32 = name.strip_prefix("nbd")?.parse().ok()?;
            let backend = std::fs::read_to_string(e.path().join("backend")).ok()?;
            (backend.trim_end() == volume_id && !e.path().join("pid").exists()).then_some(index)
        })
    }

    /// Connects to the export and runs the handshake; the socket is then ready for the kernel.
    async fn connect_export(nbd_uri: &str) -> Result<(OwnedFd, u64, u16)> {
        let uri = NbdUri::parse(nbd_uri).map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
        let agent = |e: hlstore_core::error::Error| CsiError::Tool(format!("NBD handshake with {nbd_uri}: {e}"));
        let io = |e: std::io::Error| CsiError::io(format!("connecting to {nbd_uri}"), e);
        let fut = async {
            match &uri.address {
                NbdAddress::Tcp { host, port } => {
                    let mut s =
                        tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), *port)).await.map_err(io)?;
                    s.set_nodelay(true).map_err(io)?;
                    let info = negotiate(&mut s, &uri.export).await.map_err(agent)?;
                    let s = s.into_std().map_err(io)?;
                    s.set_nonblocking(false).map_err(io)?;
                    Ok((OwnedFd::from(s), info.size, info.flags))
                }
                NbdAddress::Unix(path) => {
                    let mut s = tokio::net::UnixStream::connect(path).await.map_err(io)?;
                    let info = negotiate(&mut s, &uri.export).await.map_err(agent)?;
                    let s = s.into_std().map_err(io)?;
                    s.set_nonblocking(false).map_err(io)?;
                    Ok((OwnedFd::from(s), info.size, info.flags))
                }
            }
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
            .await
            .map_err(|_| CsiError::Tool(format!("NBD handshake with {nbd_uri} timed out")))?
    }

    fn config(&self, volume_id: &str, size: u64, flags: u16, fd: &OwnedFd) -> ConnectConfig {
        ConnectConfig {
            size,
            block_size: self.settings.block_size,
            timeout_secs: self.settings.timeout_secs,
            dead_conn_timeout_secs: self.settings.dead_conn_timeout_secs,
            server_flags: u64::from(flags),
            backend: volume_id.to_string(),
            fds: vec![fd.as_raw_fd() as u32],
        }
    }

    fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs one NBD command on the blocking pool; returns the data replies.
    async fn nbd_command(&self, build: impl FnOnce(u16, u32) -> Vec<u8> + Send + 'static) -> Result<Vec<Reply>> {
        let (s1, s2) = (self.next_seq(), self.next_seq());
        tokio::task::spawn_blocking(move || {
            let sock = GenlSocket::open()?;
            let family = sock.family(netlink::NBD_FAMILY_NAME, s1)?;
            sock.transact(&build(family, s2), s2)
        })
        .await
        .map_err(|e| CsiError::Internal(format!("netlink task: {e}")))?
    }
}

#[tonic::async_trait]
impl Attacher for NbdAttacher {
    async fn attach(&self, volume_id: &str, nbd_uri: &str) -> Result<PathBuf> {
        Self::require_module()?;
        if let Some(i) = Self::find_index(volume_id) {
            return Ok(PathBuf::from(format!("/dev/nbd{i}")));
        }
        let (fd, size, flags) = Self::connect_export(nbd_uri).await?;
        let cfg = self.config(volume_id, size, flags, &fd);
        let replies = self.nbd_command(move |fam, seq| netlink::connect(fam, seq, &cfg)).await?;
        // The kernel holds its own reference to the socket now.
        drop(fd);
        let index = replies
            .iter()
            .find_map(|r| match r {
                Reply::Data { attrs, .. } => netlink::attr_u32(attrs, netlink::NBD_ATTR_INDEX).ok().flatten(),
                _ => None,
            })
            .ok_or_else(|| CsiError::Internal("NBD_CMD_CONNECT answered without a device index".into()))?;
        let dev = PathBuf::from(format!("/dev/nbd{index}"));
        tracing::info!(volume.id = volume_id, device = %dev.display(), size, "attached through kernel NBD");
        Ok(dev)
    }

    async fn find(&self, volume_id: &str) -> Result<Option<PathBuf>> {
        Ok(Self::find_index(volume_id).map(|i| PathBuf::from(format!("/dev/nbd{i}"))))
    }

    async fn detach(&self, volume_id: &str) -> Result<()> {
        let Some(index) = Self::find_index(volume_id) else { return Ok(()) };
        self.nbd_command(move |fam, seq| netlink::disconnect(fam, seq, index)).await?;
        tracing::info!(volume.id = volume_id, device = index, "kernel NBD device disconnected");
        Ok(())
    }

    async fn problem(&self, volume_id: &str) -> Result<Option<String>> {
        // A device whose connection died keeps its backend identifier but loses its pid.
        let Ok(rd) = std::fs::read_dir("/sys/block") else { return Ok(None) };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with("nbd")
                && std::fs::read_to_string(e.path().join("backend")).is_ok_and(|b| b.trim_end() == volume_id);
            if ours && !e.path().join("pid").exists() {
                return Ok(Some(format!("/dev/{name} has lost its connection to the engine")));
            }
        }
        Ok(None)
    }

    fn disconnected(&self) -> Vec<String> {
        // A device whose connection died keeps its backend identifier but loses its pid.
        let Ok(rd) = std::fs::read_dir("/sys/block") else { return Vec::new() };
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("nbd") && !e.path().join("pid").exists())
            .filter_map(|e| std::fs::read_to_string(e.path().join("backend")).ok())
            .map(|b| b.trim_end().to_string())
            .filter(|b| !b.is_empty())
            .collect()
    }

    async fn reconnect(&self, volume_id: &str, nbd_uri: &str) -> Result<bool> {
        let Some(index) = Self::dead_index(volume_id) else { return Ok(false) };
        let (fd, _size, _flags) = Self::connect_export(nbd_uri).await?;
        let raw = fd.as_raw_fd() as u32;
        let backend = volume_id.to_string();
        self.nbd_command(move |fam, seq| netlink::reconnect(fam, seq, index, &backend, &[raw])).await?;
        // The kernel holds its own reference to the socket now.
        drop(fd);
        Ok(true)
    }

    async fn refresh_size(&self, volume_id: &str, nbd_uri: &str, want: u64) -> Result<u64> {
        let index = Self::find_index(volume_id)
            .ok_or_else(|| CsiError::NotFound(format!("volume {volume_id} has no NBD device on this node")))?;
        let dev = PathBuf::from(format!("/dev/nbd{index}"));
        let current = crate::mount::device_size(&dev)?;
        if current >= want {
            return Ok(current);
        }
        // A fresh handshake tells the export's current size; that connection is only asked.
        let (fd, size, flags) = Self::connect_export(nbd_uri).await?;
        let mut cfg = self.config(volume_id, size, flags, &fd);
        drop(fd);
        cfg.fds.clear();
        if size < want {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {volume_id}: the export has {size} bytes, less than {want}; expand the volume first"
            )));
        }
        self.nbd_command(move |fam, seq| netlink::reconfigure(fam, seq, index, &cfg)).await?;
        let now = crate::mount::device_size(&dev)?;
        if now < want {
            return Err(CsiError::FailedPrecondition(format!(
                "{}: the kernel kept {now} bytes after reconfigure (wanted {want}); unstage and stage the volume again",
                dev.display()
            )));
        }
        Ok(now)
    }
}

/// A generic netlink socket (blocking, with a receive timeout).
struct GenlSocket {
    fd: OwnedFd,
}

impl GenlSocket {
    fn open() -> Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked below.
        let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_GENERIC) };
        if raw < 0 {
            return Err(CsiError::io("opening a generic netlink socket", std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_nl is valid; we set the family.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(CsiError::io("binding the netlink socket", std::io::Error::last_os_error()));
        }
        let tv = libc::timeval { tv_sec: NETLINK_TIMEOUT.as_secs() as libc::time_t, tv_usec: 0 };
        // SAFETY: `tv` is a valid timeval of the size passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Self { fd })
    }

    /// Sends `msg` and reads replies until the ACK (or error) for `seq`.
    fn transact(&self, msg: &[u8], seq: u32) -> Result<Vec<Reply>> {
        // SAFETY: `msg` is a valid buffer of the length passed.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(CsiError::io("sending a netlink request", std::io::Error::last_os_error()));
        }
        let mut data = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: `buf` is a valid, writable buffer of the length passed.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(CsiError::io("reading a netlink reply", std::io::Error::last_os_error()));
            }
            for r in netlink::parse_replies(&buf[..n as usize])? {
                match r {
                    Reply::Ack { seq: s } if s == seq => return Ok(data),
                    Reply::Error { seq: s, errno } if s == seq => {
                        return Err(CsiError::io(
                            "kernel NBD netlink request",
                            std::io::Error::from_raw_os_error(errno),
                        ))
                    }
                    r @ Reply::Data { seq: s, .. } if s == seq => data.push(r),
                    _ => {}
                }
            }
        }
    }

    /// The id of generic netlink family `name`.
    fn family(&self, name: &str, seq: u32) -> Result<u16> {
        let replies = self.transact(&netlink::get_family(name, seq), seq)?;
        replies
            .iter()
            .find_map(|r| match r {
                Reply::Data { attrs, .. } => netlink::attr_u32(attrs, netlink::CTRL_ATTR_FAMILY_ID).ok().flatten(),
                _ => None,
            })
            .map(|id| id as u16)
            .ok_or_else(|| CsiError::FailedPrecondition(format!("generic netlink family {name:?} not found")))
    }
}
