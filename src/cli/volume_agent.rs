//! `GrpcAgent`: [`hlstore_backup::volume::VolumeAgent`] over a node agent's `Volumes` gRPC
//! service; restores write through `GrpcSink` (the agent's `WriteVolume`, no NBD port
//! needed) or, with agents older than that call, `NbdSink` (the engine's NBD export).
//!
//! The backup engine is synchronous and runs on plain threads, so each call blocks on the
//! runtime handle (never from inside an async task). Protobuf types stop here.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use hlstore_backup::volume::{VolumeAgent, VolumeSnapshot};
use hlstore_backup::{Error, RestoreSink, Result};
use hlstore_nbd_client::{ClientOptions, NbdClient, NbdUri};
use hlstore_proto::volume as vpb;
use hlstore_proto::volume::volumes_client::VolumesClient;
use tokio::runtime::Handle;
use tonic::transport::Channel;

/// A node agent reached over gRPC.
pub struct GrpcAgent {
    handle: Handle,
    client: VolumesClient<Channel>,
    endpoint: String,
    /// The volume `attach_volume` attached on this agent (restores write to it).
    attached_volume: std::sync::Mutex<Option<String>>,
}

impl GrpcAgent {
    /// Connects to `endpoint` (blocking; call from a blocking thread).
    pub fn connect(handle: Handle, endpoint: &str) -> anyhow::Result<Self> {
        let client = handle.block_on(super::volume::connect(endpoint))?;
        Ok(GrpcAgent { handle, client, endpoint: endpoint.to_string(), attached_volume: Default::default() })
    }

    /// The labels of `volume`.
    pub fn volume_labels(&self, volume: &str) -> Result<std::collections::BTreeMap<String, String>> {
        let mut c = self.client.clone();
        let v = self
            .handle
            .block_on(c.get_volume(vpb::GetVolumeRequest { name: volume.into() }))
            .map_err(|s| self.err(&format!("look up volume {volume}"), s))?;
        Ok(v.into_inner().labels.into_iter().collect())
    }

    fn err(&self, op: &str, s: tonic::Status) -> Error {
        if s.code() == tonic::Code::Unimplemented {
            Error::Agent(format!(
                "{op}: the node agent at {} does not support this yet ({}); upgrade the node agents",
                self.endpoint,
                s.message()
            ))
        } else {
            Error::Agent(format!("{op}: {}", s.message()))
        }
    }
}

fn snapshot(s: vpb::Snapshot) -> VolumeSnapshot {
    VolumeSnapshot {
        volume: s.volume,
        name: s.name,
        seq: s.seq,
        size: s.size,
        created: s.created,
        ready: s.ready,
        labels: s.labels.into_iter().collect(),
    }
}

impl VolumeAgent for GrpcAgent {
    fn create_snapshot(&self, volume: &str, name: &str, labels: &BTreeMap<String, String>) -> Result<VolumeSnapshot> {
        let req = vpb::CreateSnapshotRequest {
            volume: volume.into(),
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        let mut c = self.client.clone();
        let s = self.handle.block_on(c.create_snapshot(req)).map_err(|s| self.err(&format!("snapshot {volume}"), s))?;
        Ok(snapshot(s.into_inner()))
    }

    fn delete_snapshot(&self, volume: &str, name: &str) -> Result<bool> {
        let req = vpb::DeleteSnapshotRequest { volume: volume.into(), name: name.into() };
        let mut c = self.client.clone();
        let r = self
            .handle
            .block_on(c.delete_snapshot(req))
            .map_err(|s| self.err(&format!("delete snapshot {name} of {volume}"), s))?;
        Ok(r.into_inner().existed)
    }

    fn list_snapshots(&self, volume: &str) -> Result<Vec<VolumeSnapshot>> {
        let req = vpb::ListSnapshotsRequest { volume: volume.into() };
        let mut c = self.client.clone();
        let r = self
            .handle
            .block_on(c.list_snapshots(req))
            .map_err(|s| self.err(&format!("list snapshots of {volume}"), s))?;
        // The agent filters by volume; filter again so a broad answer cannot leak in.
        Ok(r.into_inner().snapshots.into_iter().map(snapshot).filter(|s| s.volume == volume).collect())
    }

    fn changed_blocks(&self, volume: &str, from: &str, to: &str) -> Result<Vec<Range<u64>>> {
        let req = vpb::ChangedBlocksRequest { volume: volume.into(), from: from.into(), to: to.into() };
        let mut c = self.client.clone();
        let what = format!("changed blocks of {volume} from {from:?} to {to:?}");
        let r = self.handle.block_on(c.changed_blocks(req)).map_err(|s| self.err(&what, s))?.into_inner();
        r.extents
            .into_iter()
            .map(|e| {
                e.offset
                    .checked_add(e.length)
                    .map(|end| e.offset..end)
                    .ok_or_else(|| Error::Agent(format!("{what}: extent {}+{} overflows", e.offset, e.length)))
            })
            .collect()
    }

    fn read_snapshot(&self, volume: &str, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let req =
            vpb::ReadSnapshotRequest { volume: volume.into(), name: name.into(), offset, length: buf.len() as u64 };
        let what = format!("read snapshot {name} of {volume} at {offset}+{}", buf.len());
        let mut c = self.client.clone();
        self.handle.block_on(async {
            let mut stream = c.read_snapshot(req).await.map_err(|s| self.err(&what, s))?.into_inner();
            // Chunks come in order and cover the range exactly.
            let mut filled = 0usize;
            while let Some(chunk) = stream.message().await.map_err(|s| self.err(&what, s))? {
                let at = offset + filled as u64;
                if chunk.offset != at || chunk.data.len() > buf.len() - filled {
                    return Err(Error::Agent(format!(
                        "{what}: got {} bytes at {}, expected data at {at}",
                        chunk.data.len(),
                        chunk.offset
                    )));
                }
                buf[filled..filled + chunk.data.len()].copy_from_slice(&chunk.data);
                filled += chunk.data.len();
            }
            if filled != buf.len() {
                return Err(Error::Agent(format!("{what}: stream ended after {filled} bytes")));
            }
            Ok(())
        })
    }

    fn volume_size(&self, volume: &str) -> Result<Option<u64>> {
        let mut c = self.client.clone();
        match self.handle.block_on(c.get_volume(vpb::GetVolumeRequest { name: volume.into() })) {
            Ok(v) => Ok(Some(v.into_inner().size)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(self.err(&format!("look up volume {volume}"), s)),
        }
    }

    fn create_volume(&self, volume: &str, size: u64, replicas: u32) -> Result<()> {
        let req = vpb::CreateVolumeRequest { name: volume.into(), size, replicas, ..Default::default() };
        let mut c = self.client.clone();
        self.handle.block_on(c.create_volume(req)).map_err(|s| self.err(&format!("create volume {volume}"), s))?;
        Ok(())
    }

    fn delete_volume(&self, volume: &str) -> Result<()> {
        let mut c = self.client.clone();
        self.handle
            .block_on(c.delete_volume(vpb::DeleteVolumeRequest { name: volume.into() }))
            .map_err(|s| self.err(&format!("delete volume {volume}"), s))?;
        Ok(())
    }

    fn attach_volume(&self, volume: &str) -> Result<String> {
        // An empty node is the agent's own node.
        let req = vpb::AttachVolumeRequest { name: volume.into(), ..Default::default() };
        let mut c = self.client.clone();
        let v = self.handle.block_on(c.attach_volume(req)).map_err(|s| self.err(&format!("attach {volume}"), s))?;
        let uri = v.into_inner().nbd_uri;
        if uri.is_empty() {
            return Err(Error::Agent(format!("attach {volume}: the agent returned no NBD URI")));
        }
        *self.attached_volume.lock().unwrap_or_else(|p| p.into_inner()) = Some(volume.to_string());
        Ok(uri)
    }

    fn detach_volume(&self, volume: &str) -> Result<()> {
        let mut c = self.client.clone();
        self.handle
            .block_on(c.detach_volume(vpb::DetachVolumeRequest { name: volume.into() }))
            .map_err(|s| self.err(&format!("detach {volume}"), s))?;
        Ok(())
    }

    fn open_writer(&self, nbd_uri: &str) -> Result<Box<dyn RestoreSink + '_>> {
        // Through the agent's authenticated API when it has it (no NBD port reached from
        // here: a restore Job runs in another pod than the engine); older agents: NBD.
        let volume = self.attached_volume.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(volume) = volume {
            let mut c = self.client.clone();
            let probe = vpb::FlushVolumeRequest { name: volume.clone() };
            match self.handle.block_on(c.flush_volume(probe)) {
                Ok(_) => return Ok(Box::new(GrpcSink { agent: self, volume })),
                Err(s) if s.code() == tonic::Code::Unimplemented => {}
                Err(s) => return Err(self.err(&format!("flush {volume}"), s)),
            }
        }
        let uri = NbdUri::parse(nbd_uri).map_err(|e| Error::Agent(e.to_string()))?;
        let opts = ClientOptions { request_timeout: Duration::from_secs(120), ..ClientOptions::default() };
        let client = self
            .handle
            .block_on(NbdClient::connect(&uri, opts))
            .map_err(|e| Error::Agent(format!("connecting to {uri}: {e}")))?;
        Ok(Box::new(NbdSink { handle: self.handle.clone(), client, uri: nbd_uri.to_string() }))
    }
}

/// Writes to a volume attached on the agent through its `WriteVolume` / `FlushVolume`
/// calls (mutual TLS, the caller's role checked); `sync` is quorum-durable.
struct GrpcSink<'a> {
    agent: &'a GrpcAgent,
    volume: String,
}

/// `WriteVolume` takes at most 4 MiB per call.
const GRPC_WRITE_PIECE: usize = 4 << 20;

impl RestoreSink for GrpcSink<'_> {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut c = self.agent.client.clone();
        for (i, piece) in data.chunks(GRPC_WRITE_PIECE).enumerate() {
            let at = offset + (i * GRPC_WRITE_PIECE) as u64;
            let req =
                vpb::WriteVolumeRequest { name: self.volume.clone(), offset: at, data: piece.to_vec(), fua: false };
            self.agent
                .handle
                .block_on(c.write_volume(req))
                .map_err(|s| self.agent.err(&format!("write {} at {at}", self.volume), s))?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let mut c = self.agent.client.clone();
        self.agent
            .handle
            .block_on(c.flush_volume(vpb::FlushVolumeRequest { name: self.volume.clone() }))
            .map_err(|s| self.agent.err(&format!("flush {}", self.volume), s))?;
        Ok(())
    }
}

/// Writes to a volume's NBD export; `sync` is an NBD FLUSH (quorum-durable).
struct NbdSink {
    handle: Handle,
    client: NbdClient,
    uri: String,
}

impl RestoreSink for NbdSink {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.handle
            .block_on(self.client.write(offset, data, false))
            .map_err(|e| Error::Agent(format!("write {} at {offset}: {e}", self.uri)))
    }

    fn sync(&self) -> Result<()> {
        self.handle.block_on(self.client.flush()).map_err(|e| Error::Agent(format!("flush {}: {e}", self.uri)))
    }
}

impl Drop for NbdSink {
    fn drop(&mut self) {
        if let Err(e) = self.handle.block_on(self.client.disconnect()) {
            tracing::debug!("nbd disconnect from {}: {e}", self.uri);
        }
    }
}
