//! A client for the control API (used by `vigil vm ...` and, later, by the
//! migration code and the HA agent): one request per connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors talking to a VMM's API socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No such file.
    #[error(
        "no API socket at {0}: the VM is not running, or was started without --api-socket {0}"
    )]
    NoSocket(PathBuf),
    /// A file exists but nobody listens.
    #[error(
        "no VMM is listening on {0}: the VMM that created it has exited (stale socket; it is \
         safe to delete)"
    )]
    NotListening(PathBuf),
    /// Connect failed otherwise (permissions...).
    #[error("cannot connect to the API socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Sending or receiving failed.
    #[error("API request to {path} failed: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not HTTP.
    #[error("the VMM at {0} answered with something that is not an HTTP response")]
    BadResponse(PathBuf),
    /// The VMM answered with an error status.
    #[error("{message} (HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The `error` field of the body.
        message: String,
    },
}

/// Sends `method path` with an optional JSON body; returns the parsed JSON
/// of a 2xx answer, or [`ClientError::Api`] with the server's message.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<serde_json::Value, ClientError> {
    let (status, text) = raw(socket, method, path, body, timeout)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|_| ClientError::BadResponse(socket.to_path_buf()))?;
    if (200..300).contains(&status) {
        Ok(v)
    } else {
        Err(ClientError::Api {
            status,
            message: v
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("unknown error")
                .to_string(),
        })
    }
}

/// Like [`call`] but returns the status and the raw body whatever the status.
pub fn raw(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<(u16, String), ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ClientError::NoSocket(socket.to_path_buf()),
        std::io::ErrorKind::ConnectionRefused => ClientError::NotListening(socket.to_path_buf()),
        _ => ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        },
    })?;
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(io)?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| ClientError::BadResponse(socket.to_path_buf()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| ClientError::BadResponse(socket.to_path_buf()))?;
    Ok((status, body.to_string()))
}
