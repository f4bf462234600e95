//! A blocking HTTP/1.0 GET client for the agent's health and metrics ports (the
//! demo and the agent's tests); the shipped agent only serves HTTP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A failed GET; each names the URL.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// The GET failed at the socket level.
    #[error("GET http://{addr}{path}: {source}")]
    Io {
        /// The server.
        addr: SocketAddr,
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The answer was not HTTP.
    #[error("GET http://{addr}{path}: malformed response: {what}")]
    Malformed {
        /// The server.
        addr: SocketAddr,
        /// The path.
        path: String,
        /// What was wrong.
        what: String,
    },
}

/// A blocking `GET path` (HTTP/1.0, connection closed after); returns status and body.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), GetError> {
    let io = |source| GetError::Io {
        addr,
        path: path.to_owned(),
        source,
    };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    parse_response(&raw).map_err(|what| GetError::Malformed {
        addr,
        path: path.to_owned(),
        what,
    })
}

/// Splits a raw HTTP/1.x response into status and body.
pub fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "no end of headers".to_owned())?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(code))) if v.starts_with("HTTP/1.") => Ok((code, body.to_owned())),
        _ => Err(format!("bad status line {status_line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses() {
        let raw = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 3\r\n\r\nno\n";
        assert_eq!(parse_response(raw), Ok((503, "no\n".into())));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
    }

    #[test]
    fn a_refused_connection_names_the_url() {
        // Bind then drop: the port is closed (loopback only).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = get(addr, "/readyz", Duration::from_secs(1)).unwrap_err();
        assert!(
            err.to_string().contains(&format!("http://{addr}/readyz")),
            "{err}"
        );
    }
}
