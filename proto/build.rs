//! Generates the provider API v1 gRPC code from `proto/tlshub/provider/v1/provider.proto`.
fn main() -> anyhow::Result<()> {
    let proto = "proto/tlshub/provider/v1/provider.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&[proto], &["proto"])
        .map_err(|e| anyhow::anyhow!("protoc failed on {proto} (is protobuf-compiler installed? `cargo xtask deps` installs it): {e}"))?;
    Ok(())
}
