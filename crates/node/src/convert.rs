//! `hlstore.volume.v1` ↔ domain ([`crate::model`]) conversions, one per type: the only
//! place the node agent turns volume-service messages into its own values and back, for
//! the service (`service.rs`, server side) and for calls to peers (`peers.rs`, client
//! side). Requests are validated by the service on entry.

use hlstore_proto::volume as vpb;
use hlstore_replication::ScrubReport;

use crate::model::{ChangedBlocks, CloneSpec, NewVolume, NodeInfo, Snapshot, Volume, VolumeReplica, VolumeScrub};

pub fn node_to_pb(n: NodeInfo) -> vpb::Node {
    vpb::Node {
        id: n.id,
        endpoint: n.endpoint,
        reachable: n.reachable,
        capacity_bytes: n.space.map_or(0, |s| s.total),
        available_bytes: n.space.map_or(0, |s| s.available),
        promised_bytes: n.promised_bytes,
        replicas: n.replicas,
    }
}

pub fn volume_to_pb(v: Volume) -> vpb::Volume {
    vpb::Volume {
        name: v.name,
        size: v.size,
        replica_set: v.replica_set,
        write_quorum: v.write_quorum,
        epoch: v.epoch,
        attached_node: v.attached_node,
        nbd_uri: v.nbd_uri,
        replicas: v.replicas.into_iter().map(replica_to_pb).collect(),
        labels: v.labels.into_iter().collect(),
    }
}

pub fn volume_from_pb(v: vpb::Volume) -> Volume {
    Volume {
        name: v.name,
        size: v.size,
        replica_set: v.replica_set,
        write_quorum: v.write_quorum,
        epoch: v.epoch,
        attached_node: v.attached_node,
        nbd_uri: v.nbd_uri,
        replicas: v.replicas.into_iter().map(replica_from_pb).collect(),
        labels: v.labels.into_iter().collect(),
    }
}

fn replica_to_pb(r: VolumeReplica) -> vpb::ReplicaStatus {
    vpb::ReplicaStatus {
        node: r.node,
        state: r.state,
        last_seq: r.last_seq,
        durable_seq: r.durable_seq,
        allocated_bytes: r.allocated_bytes,
        resync_chunks: r.resync_chunks,
        resync_resumed_from: r.resync_resumed_from,
    }
}

fn replica_from_pb(r: vpb::ReplicaStatus) -> VolumeReplica {
    VolumeReplica {
        node: r.node,
        state: r.state,
        last_seq: r.last_seq,
        durable_seq: r.durable_seq,
        allocated_bytes: r.allocated_bytes,
        resync_chunks: r.resync_chunks,
        resync_resumed_from: r.resync_resumed_from,
    }
}

pub fn new_volume_from_pb(r: vpb::CreateVolumeRequest) -> NewVolume {
    NewVolume {
        name: r.name,
        size: r.size,
        replicas: r.replicas,
        nodes: r.nodes,
        write_quorum: r.write_quorum,
        labels: r.labels.into_iter().collect(),
    }
}

pub fn clone_from_pb(r: vpb::CloneVolumeRequest) -> CloneSpec {
    CloneSpec {
        source: r.source,
        name: r.name,
        snapshot: r.snapshot,
        replicas: r.replicas,
        nodes: r.nodes,
        labels: r.labels.into_iter().collect(),
        size: r.size,
    }
}

pub fn snapshot_to_pb(s: Snapshot) -> vpb::Snapshot {
    vpb::Snapshot {
        volume: s.volume,
        name: s.name,
        seq: s.seq,
        size: s.size,
        created: s.created,
        ready: s.ready,
        labels: s.labels.into_iter().collect(),
    }
}

pub fn snapshot_from_pb(s: vpb::Snapshot) -> Snapshot {
    Snapshot {
        volume: s.volume,
        name: s.name,
        seq: s.seq,
        size: s.size,
        created: s.created,
        ready: s.ready,
        labels: s.labels.into_iter().collect(),
    }
}

pub fn changed_blocks_to_pb(c: ChangedBlocks) -> vpb::ChangedBlocksResponse {
    vpb::ChangedBlocksResponse {
        extents: c.extents.into_iter().map(|e| vpb::Extent { offset: e.offset, length: e.length }).collect(),
        block_size: c.block_size,
    }
}

pub fn scrub_to_pb(s: VolumeScrub) -> vpb::ScrubVolumeResponse {
    let r = s.report;
    vpb::ScrubVolumeResponse {
        name: s.name,
        blocks: r.blocks,
        corrupt: r.corrupt,
        repaired: r.repaired,
        divergent: r.divergent,
        unrecoverable: r.unrecoverable,
        replicas: r.replicas,
    }
}

pub fn scrub_from_pb(s: vpb::ScrubVolumeResponse) -> VolumeScrub {
    VolumeScrub {
        name: s.name,
        report: ScrubReport {
            blocks: s.blocks,
            corrupt: s.corrupt,
            repaired: s.repaired,
            divergent: s.divergent,
            unrecoverable: s.unrecoverable,
            replicas: s.replicas,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn labels() -> BTreeMap<String, String> {
        BTreeMap::from([("k".to_string(), "v".to_string())])
    }

    #[test]
    fn volume_round_trips() {
        let v = Volume {
            name: "vol".into(),
            size: 1 << 30,
            replica_set: vec!["n1".into(), "n2".into()],
            write_quorum: 2,
            epoch: 7,
            attached_node: "n1".into(),
            nbd_uri: "nbd://127.0.0.1:10809/vol".into(),
            replicas: vec![VolumeReplica {
                node: "n2".into(),
                state: "resyncing".into(),
                last_seq: 9,
                durable_seq: 8,
                allocated_bytes: 4096,
                resync_chunks: 3,
                resync_resumed_from: 8192,
            }],
            labels: labels(),
        };
        assert_eq!(volume_from_pb(volume_to_pb(v.clone())), v);
    }

    #[test]
    fn snapshot_and_scrub_round_trip() {
        let s = Snapshot {
            volume: "vol".into(),
            name: "s".into(),
            seq: 7,
            size: 32768,
            created: 5,
            ready: true,
            labels: labels(),
        };
        let p = snapshot_to_pb(s.clone());
        assert_eq!(
            (p.volume.as_str(), p.name.as_str(), p.seq, p.size, p.created, p.ready),
            ("vol", "s", 7, 32768, 5, true)
        );
        assert_eq!(p.labels.get("k").map(String::as_str), Some("v"));
        assert_eq!(snapshot_from_pb(p), s);
        let report = ScrubReport { blocks: 10, corrupt: 2, repaired: 1, divergent: 0, unrecoverable: 1, replicas: 3 };
        let scrub = VolumeScrub { name: "vol".into(), report };
        assert_eq!(scrub_from_pb(scrub_to_pb(scrub.clone())), scrub);
    }
}
