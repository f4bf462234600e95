//! Compiles the `.proto` files with protox (no `protoc` needed on the build host).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        ["proto/plugin.proto", "proto/zds.proto", "proto/admin.proto"],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
