//! Test-only helpers shared by unit tests of several modules.

use tokio::task::JoinHandle;

/// A Kube client whose API server accepts connections and never answers (a stalled
/// apiserver), and the task holding those connections open (abort it when done).
pub fn stalled_api_server_client() -> (kube::Client, JoinHandle<()>) {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = std_listener.local_addr().expect("local addr");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let cfg = kube::Config::new(format!("http://{addr}").parse().expect("url"));
    (kube::Client::try_from(cfg).expect("client"), hold)
}
