//! Generates Rust code for every .proto file under the workspace's `proto/` directory.
//! protoc comes from the `protoc-bin-vendored` crate so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["replica.proto", "volume.proto", "csi.proto"].map(|f| root.join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    // Write payloads as `Bytes`: one buffer from the NBD request to every replica's stream
    // (encoding copies it into the frame; no copy per replica before that). Resync chunks
    // likewise: decoded as slices of the received message, read as slices of one run.
    tonic_prost_build::configure()
        .bytes(".hlstore.replica.v1.WriteRequest.data")
        .bytes(".hlstore.replica.v1.ResyncChunk.data")
        .compile_protos(&files, &[root])?;
    Ok(())
}
