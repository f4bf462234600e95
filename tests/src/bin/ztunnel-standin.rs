//! A ztunnel stand-in for tests and the demo (placeholder; built out by the agent-core work).
fn main() {}
