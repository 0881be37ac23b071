//! Generates the admin API v1 gRPC code from `proto/proto/tlshub/admin/v1/admin.proto`.
fn main() -> anyhow::Result<()> {
    let dir = "../proto/proto";
    let proto = "../proto/proto/tlshub/admin/v1/admin.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // tlshubctl prints every answer as JSON too, and the test bed reads
        // that JSON back as these types (fields it leaves out read as
        // their defaults, as protobuf's do).
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".", "#[serde(default)]")
        .compile_protos(&[proto], &[dir])
        .map_err(|e| anyhow::anyhow!("protoc failed on {proto} (is protobuf-compiler installed? `cargo xtask deps` installs it): {e}"))?;
    Ok(())
}
