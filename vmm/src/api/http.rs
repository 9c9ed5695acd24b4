//! The little HTTP/1.1 the control API needs: read one bounded request
//! (parsed by `httparse`), write one JSON response, close.
//!
//! Limits: headers at most [`MAX_HEAD_BYTES`], bodies at most
//! [`MAX_BODY_BYTES`] and only with Content-Length (no chunked encoding).
//! Anything else is a [`HttpError`] that maps to a 4xx status; nothing a
//! client sends can panic the server.

use std::io::{Read, Write};

/// Request line plus headers.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 32;

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Not HTTP/1.x or broken framing.
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    /// Headers or body over the limits.
    #[error("request too large: {0}")]
    TooLarge(String),
    /// The connection failed or closed early.
    #[error("connection error: {0}")]
    Io(#[source] std::io::Error),
}

impl HttpError {
    /// The status to answer with (None: the peer is gone, do not answer).
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Malformed(_) => Some(400),
            Self::TooLarge(_) => Some(413),
            Self::Io(_) => None,
        }
    }
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// GET, PUT...
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Query parameters in order (no percent-decoding: our values are
    /// numbers and words).
    pub query: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Request {
    /// A query parameter's value.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a complete request from `buf`. `Ok(None)` means "need more bytes".
pub fn parse(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD_BYTES {
                return Err(HttpError::TooLarge(format!(
                    "headers exceed {MAX_HEAD_BYTES} bytes"
                )));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::TooLarge(format!(
                "more than {MAX_HEADERS} headers"
            )))
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(HttpError::TooLarge(format!(
            "headers exceed {MAX_HEAD_BYTES} bytes"
        )));
    }
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    let mut content_length = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| HttpError::Malformed("bad Content-Length".to_string()))?;
            content_length = v;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Malformed(
                "Transfer-Encoding is not supported; send a Content-Length".to_string(),
            ));
        }
    }
    if content_length > MAX_BODY_BYTES {
        return Err(HttpError::TooLarge(format!(
            "body of {content_length} bytes exceeds {MAX_BODY_BYTES}"
        )));
    }
    let have = buf.len() - head_len;
    if have < content_length {
        return Ok(None);
    }
    let body = buf[head_len..head_len + content_length].to_vec();
    let (path, qs) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    if !path.starts_with('/') {
        return Err(HttpError::Malformed(format!(
            "request target `{target}` must start with /"
        )));
    }
    let query = qs
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect();
    Ok(Some(Request {
        method,
        path: path.to_string(),
        query,
        body,
    }))
}

/// Reads one request from `r`, never more than the limits allow.
pub fn read_request(r: &mut impl Read) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = r.read(&mut chunk).map_err(HttpError::Io)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HttpError::Io(std::io::ErrorKind::UnexpectedEof.into())
            } else {
                HttpError::Malformed("connection closed before the request was complete".into())
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_HEAD_BYTES + MAX_BODY_BYTES {
            return Err(HttpError::TooLarge(
                "request exceeds the size limits".into(),
            ));
        }
        if let Some(req) = parse(&buf)? {
            return Ok(req);
        }
    }
}

/// The reason phrase for the statuses we use.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes a complete response with a JSON body and closes the exchange.
pub fn write_json(
    w: &mut impl Write,
    status: u16,
    body: &serde_json::Value,
) -> std::io::Result<()> {
    let text = body.to_string();
    write!(
        w,
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{text}",
        reason(status),
        text.len() + 1
    )?;
    w.write_all(b"\n")?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_get() {
        let r = parse(b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/vm");
        assert!(r.body.is_empty());
    }

    #[test]
    fn put_with_body_and_query() {
        let raw = b"PUT /vm/shutdown?timeout_s=5&x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        let r = parse(raw).unwrap().unwrap();
        assert_eq!(r.path, "/vm/shutdown");
        assert_eq!(r.query_param("timeout_s"), Some("5"));
        assert_eq!(r.query_param("x"), Some(""));
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn partial_needs_more() {
        assert!(parse(b"GET /vm HTTP/1.1\r\nHo").unwrap().is_none());
        let raw = b"PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"a\"";
        assert!(parse(raw).unwrap().is_none());
    }

    #[test]
    fn malformed_is_400() {
        for raw in [
            &b"\x00\x01\x02 garbage\r\n\r\n"[..],
            b"GET /vm HTTP/9.9\r\n\r\n",
            b"GET vm HTTP/1.1\r\n\r\n",
            b"PUT /vm HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let e = parse(raw).unwrap_err();
            assert_eq!(e.status(), Some(400), "{raw:?}: {e}");
        }
    }

    #[test]
    fn oversized_is_413() {
        let mut raw = b"GET /vm HTTP/1.1\r\nX-Big: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
        assert_eq!(parse(&raw).unwrap_err().status(), Some(413));
        let raw = format!(
            "PUT /vm/snapshot HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert_eq!(parse(raw.as_bytes()).unwrap_err().status(), Some(413));
        let mut many = b"GET /vm HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            many.extend(format!("H{i}: v\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(parse(&many).unwrap_err().status(), Some(413));
    }

    #[test]
    fn read_request_stops_at_eof() {
        let mut r: &[u8] = b"GET /vm HTTP/1.1\r\n";
        assert_eq!(read_request(&mut r).unwrap_err().status(), Some(400));
        let mut r: &[u8] = b"GET /vm HTTP/1.1\r\n\r\n";
        assert_eq!(read_request(&mut r).unwrap().path, "/vm");
    }

    #[test]
    fn response_framing() {
        let mut out = Vec::new();
        write_json(&mut out, 404, &serde_json::json!({"error": "x"})).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\n"));
        let (head, body) = s.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert_eq!(body.trim(), r#"{"error":"x"}"#);
    }
}
