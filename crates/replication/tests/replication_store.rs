//! A replicated volume over the real replica service: `DiskStore` (block files + RocksDB)
//! behind `ReplicaService` on loopback gRPC servers, reached through cuttable TCP
//! forwarders that model a node dropping off the network.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hlstore_core::{BlockDevice, ErrorKind};
use hlstore_core::{Epoch, Offset};
use hlstore_proto::replica::replica_server::ReplicaServer;
use hlstore_replication::rpc::ReplicaService;
use hlstore_replication::{
    AnyReplica, GrpcReplica, LocalReplica, MachineConfig, ReplicaHealth, ReplicaStatus, ReplicatedVolume, VolumeConfig,
};
use hlstore_store::{DiskStore, ReplicaStore, VolumeRecord};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio_stream::wrappers::TcpListenerStream;

const BS: u64 = 4096;
const SIZE: u64 = 128 * BS;
const VOLUME: &str = "vol-store";

/// A TCP forwarder that can drop every connection and refuse new ones (a partition).
struct Link {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Link {
    async fn to(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns2.lock().unwrap().push(task.abort_handle());
            }
        })
        .abort_handle();
        Self { addr, up, conns, accept }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

struct Node {
    store: Arc<DiskStore>,
    link: Link,
    server: Server,
    _dir: tempfile::TempDir,
}

/// The node's gRPC server task, stopped when dropped.
struct Server(AbortHandle);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn node(i: usize) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskStore::open_simulating_power_loss(dir.path()).unwrap());
    let mut record = VolumeRecord::new(VOLUME, SIZE);
    record.replica_set = (0..3).map(|n| format!("node-{n}")).collect();
    store.create(record).unwrap();
    serve(store, dir, i).await
}

/// A power cut on `n`: its server stops, every slot no fdatasync covered loses its data,
/// and the node comes back (new address) with the store reopened and recovered.
async fn power_cut(n: Node, i: usize) -> Node {
    let Node { store, link, server, _dir: dir } = n;
    link.cut();
    drop(server);
    drop(link);
    let start = Instant::now();
    while Arc::strong_count(&store) > 1 {
        assert!(start.elapsed() < Duration::from_secs(10), "the stopped server still holds the store");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let store = Arc::try_unwrap(store).unwrap_or_else(|_| unreachable!());
    assert!(store.power_cut().unwrap() > 0, "the power cut lost unsynced data");
    let store = Arc::new(DiskStore::open_simulating_power_loss(dir.path()).unwrap());
    serve(store, dir, i).await
}

async fn serve(store: Arc<DiskStore>, dir: tempfile::TempDir, i: usize) -> Node {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = ReplicaService::new(store.clone());
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(ReplicaServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    })
    .abort_handle();
    let link = Link::to(addr).await;
    let _ = i;
    Node { store, link, server: Server(server), _dir: dir }
}

fn config() -> VolumeConfig {
    let mut m = MachineConfig::new(3);
    m.ack_timeout_ms = 300;
    m.failure_timeout_ms = 1_500;
    m.io_timeout_ms = 5_000;
    m.retry_interval_ms = 100;
    let mut c = VolumeConfig::new(VOLUME, SIZE, m);
    c.tick = Duration::from_millis(20);
    c
}

fn clients(nodes: &[Node]) -> Vec<GrpcReplica> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            GrpcReplica::connect_lazy(format!("node-{i}"), VOLUME, &format!("http://{}", n.link.addr)).unwrap()
        })
        .collect()
}

fn block(tag: u8, i: u64) -> Vec<u8> {
    let mut b = vec![tag; BS as usize];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

async fn wait_for(vol: &ReplicatedVolume, what: &str, pred: impl Fn(&[ReplicaHealth]) -> bool) {
    let start = Instant::now();
    loop {
        let r = vol.replicas();
        if pred(&r) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting for {what}: {r:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads the whole volume straight from one store.
fn image(n: &Node, epoch: u64) -> Vec<u8> {
    n.store.read(VOLUME, Epoch(epoch), Offset(0), SIZE).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_volume_over_disk_stores_survives_a_partition_and_resyncs_incrementally() {
    let nodes = vec![node(0).await, node(1).await, node(2).await];
    let vol = ReplicatedVolume::attach(config(), clients(&nodes)).await.unwrap();
    let epoch = vol.epoch();
    assert_eq!(epoch, 1);
    // A replica that answers the attach late is resynced first; start from all healthy.
    wait_for(&vol, "all healthy", |r| r.iter().all(|i| i.status == ReplicaStatus::Healthy)).await;
    for i in 0..32 {
        vol.write(i * BS, block(1, i), i % 8 == 0).await.unwrap();
    }
    vol.flush().await.unwrap();
    // The last write's seq: the highest any replica acknowledged (the quorum that acked it
    // need not include replica 0).
    let last = vol.replicas().iter().map(|r| r.acked_seq).max().unwrap();
    wait_for(&vol, "node-2 durable", |r| r[2].durable_seq >= last).await;

    nodes[2].link.cut();
    for i in [3u64, 9, 17, 30, 31, 40, 41, 100] {
        vol.write(i * BS, block(2, i), false).await.unwrap();
    }
    vol.trim(20 * BS, BS).await.unwrap();
    vol.flush().await.unwrap();
    wait_for(&vol, "node-2 failed", |r| r[2].status == ReplicaStatus::Failed).await;

    let before = vol.replicas()[2].resync_chunks;
    nodes[2].link.restore();
    wait_for(&vol, "node-2 healthy", |r| r[2].status == ReplicaStatus::Healthy).await;
    // Eight blocks and one trim changed while it was away: nothing else is copied.
    assert_eq!(vol.replicas()[2].resync_chunks - before, 9, "{:?}", vol.replicas());
    let want = vol.read(0, SIZE).await.unwrap();
    assert_eq!(&want[20 * BS as usize..21 * BS as usize], &vec![0u8; BS as usize][..]);
    assert_eq!(&want[100 * BS as usize..101 * BS as usize], &block(2, 100)[..]);
    for (i, n) in nodes.iter().enumerate() {
        assert!(image(n, epoch) == want, "node-{i} differs from the volume");
        assert_eq!(n.store.state(VOLUME).unwrap().resync_from, None, "node-{i} resync mark");
    }

    // Another engine takes over; the first is fenced by the real service.
    let second = ReplicatedVolume::attach(config(), clients(&nodes)).await.unwrap();
    assert_eq!(second.epoch(), 2);
    let err = vol.write(0, block(9, 0), false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StaleEpoch, "{err}");
    second.write(0, block(3, 0), true).await.unwrap();
    assert!(second.read(0, BS).await.unwrap() == block(3, 0), "read after takeover");
    wait_for(&second, "all nodes applied it", |r| r.iter().all(|i| i.acked_seq == r[0].acked_seq)).await;
    for (i, n) in nodes.iter().enumerate() {
        assert!(n.store.read(VOLUME, Epoch(2), Offset(0), BS).unwrap() == block(3, 0), "node-{i}");
    }
    second.close().await;
    vol.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_the_volume_stops_writing_instead_of_acking_a_minority() {
    let nodes = vec![node(0).await, node(1).await, node(2).await];
    let mut c = config();
    c.machine.io_timeout_ms = 1_000;
    let vol = ReplicatedVolume::attach(c, clients(&nodes)).await.unwrap();
    vol.write(0, block(1, 0), false).await.unwrap();
    nodes[1].link.cut();
    nodes[2].link.cut();
    let start = Instant::now();
    let err = vol.write(BS, block(2, 1), false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(start.elapsed() >= Duration::from_millis(950), "failed after {:?}", start.elapsed());
    nodes[1].link.restore();
    wait_for(&vol, "node-1 healthy", |r| r[1].status == ReplicaStatus::Healthy).await;
    vol.write(2 * BS, block(3, 2), false).await.unwrap();
    vol.flush().await.unwrap();
    assert!(
        nodes[1].store.read(VOLUME, Epoch(1), Offset(2 * BS), BS).unwrap() == block(3, 2),
        "node-1 has the new write"
    );
    vol.close().await;
}

/// A replica that lost acknowledged but unflushed writes in a power cut must not pass for
/// complete: the next engine resyncs it, and every replica ends with the same content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_unflushed_writes_in_a_power_cut_is_resynced() {
    let mut nodes = vec![node(0).await, node(1).await, node(2).await];
    let vol = ReplicatedVolume::attach(config(), clients(&nodes)).await.unwrap();
    wait_for(&vol, "all healthy", |r| r.iter().all(|i| i.status == ReplicaStatus::Healthy)).await;
    for i in 0..16 {
        vol.write(i * BS, block(1, i), false).await.unwrap();
    }
    vol.flush().await.unwrap();
    // Acknowledged by all three, flushed by none.
    for i in 0..16 {
        vol.write(i * BS, block(2, i), false).await.unwrap();
    }
    // The last write's seq: the highest any replica acknowledged (the quorum that acked it
    // need not include replica 0).
    let last = vol.replicas().iter().map(|r| r.acked_seq).max().unwrap();
    wait_for(&vol, "node-2 applied every write", |r| r[2].acked_seq >= last).await;
    // Node 2 loses power; the others flush.
    let n2 = nodes.pop().unwrap();
    nodes.push(power_cut(n2, 2).await);
    vol.flush().await.unwrap();
    vol.close().await;

    let second = ReplicatedVolume::attach(config(), clients(&nodes)).await.unwrap();
    let st = nodes[2].store.state(VOLUME).unwrap();
    wait_for(&second, "all healthy", |r| r.iter().all(|i| i.status == ReplicaStatus::Healthy)).await;
    second.flush().await.unwrap();
    let epoch = second.epoch();
    let want: Vec<u8> = (0..16).flat_map(|i| block(2, i)).collect();
    for (i, n) in nodes.iter().enumerate() {
        assert!(image(n, epoch)[..want.len()] == want[..], "node-{i} lost acknowledged writes");
    }
    assert!(st.durable_seq < last, "node-2 claimed durability it lost: {st:?}");
    second.close().await;
}

type Mixed = AnyReplica<LocalReplica<DiskStore>, GrpcReplica>;

/// node-0 in process (the engine's own node), the others over gRPC.
fn mixed_clients(nodes: &[Node]) -> Vec<Mixed> {
    clients(nodes)
        .into_iter()
        .enumerate()
        .map(|(i, c)| match i {
            0 => AnyReplica::Local(LocalReplica::new("node-0", VOLUME, nodes[0].store.clone(), Arc::default())),
            _ => AnyReplica::Remote(c),
        })
        .collect()
}

/// The engine's own replica reached in process keeps every rule the service keeps: it
/// takes writes with group commit, serves as a resync source, is resynced into after it
/// missed writes, and fences an engine whose epoch is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_replica_in_process_replicates_resyncs_both_ways_and_fences() {
    let nodes = vec![node(0).await, node(1).await, node(2).await];
    let vol = ReplicatedVolume::attach(config(), mixed_clients(&nodes)).await.unwrap();
    wait_for(&vol, "all healthy", |r| r.iter().all(|i| i.status == ReplicaStatus::Healthy)).await;
    // Many writes in flight at once, so the streams apply them in groups.
    let writes = (0..96u64).map(|i| vol.write((i % 64) * BS, block(1 + (i / 64) as u8, i % 64), i % 16 == 5));
    for r in futures::future::join_all(writes).await {
        r.unwrap();
    }
    vol.flush().await.unwrap();

    // node-2 misses writes and is resynced (node-0 or node-1 is the source).
    nodes[2].link.cut();
    for i in [3u64, 9, 70, 71, 72, 100] {
        vol.write(i * BS, block(5, i), false).await.unwrap();
    }
    vol.trim(20 * BS, 2 * BS).await.unwrap();
    wait_for(&vol, "node-2 failed", |r| r[2].status == ReplicaStatus::Failed).await;
    nodes[2].link.restore();
    wait_for(&vol, "node-2 healthy", |r| r[2].status == ReplicaStatus::Healthy).await;
    let want = vol.read(0, SIZE).await.unwrap();
    for (i, n) in nodes.iter().enumerate() {
        assert!(image(n, vol.epoch()) == want, "node-{i} differs from the volume after resync");
    }

    // A second engine over gRPC only, with node-0 cut off, writes without it; the first
    // engine (in process to node-0) is then fenced on every replica it reaches.
    nodes[0].link.cut();
    let second = ReplicatedVolume::attach(config(), clients(&nodes)).await.unwrap();
    let err = vol.write(0, block(9, 0), false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StaleEpoch, "{err}");
    vol.close().await;
    for i in [0u64, 1, 2, 64, 65, 127] {
        second.write(i * BS, block(7, i), false).await.unwrap();
    }
    second.flush().await.unwrap();
    let want = second.read(0, SIZE).await.unwrap();
    second.close().await;
    nodes[0].link.restore();

    // A third engine in process to node-0, which missed the second's writes: node-0 is
    // resynced through the in-process path.
    let third = ReplicatedVolume::attach(config(), mixed_clients(&nodes)).await.unwrap();
    wait_for(&third, "all healthy", |r| r.iter().all(|i| i.status == ReplicaStatus::Healthy)).await;
    assert!(third.read(0, SIZE).await.unwrap() == want, "the third engine reads the second's writes");
    for (i, n) in nodes.iter().enumerate() {
        assert!(image(n, third.epoch()) == want, "node-{i} differs after the in-process resync");
    }
    third.close().await;
}
