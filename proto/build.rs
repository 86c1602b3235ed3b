//! Compiles proto/switchboard/v1 with protox (pure Rust: no system protoc needed): the messages
//! (prost), the `Switchboard` service's client and server (tonic), and the encoded descriptor
//! set that the gateway's reflection service serves.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "switchboard/v1/envelope.proto",
        "switchboard/v1/switchboard.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("switchboard_v1_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    let mut config = prost_build::Config::new();
    config.bytes(["."]);
    tonic_prost_build::configure().compile_fds_with_config(fds, config)?;
    Ok(())
}
