//! A minimal blocking HTTP/1.1 client for the server's own tests and load test: one request
//! per connection (`Connection: close`), chunked bodies (server-sent events) de-chunked. Not a
//! general client: use `curl` or the `openai` package against a real deployment.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One response: status, headers (lower-case names) and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Headers by lower-case name.
    pub headers: BTreeMap<String, String>,
    /// The body, de-chunked.
    pub body: String,
}

impl Response {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The `data:` payloads of a server-sent event stream, in order.
    pub fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Sends a request (JSON `body`, bearer `key` if given) and returns the open connection, to
/// read the response from later (or to drop: a client hanging up).
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    Ok(stream)
}

/// Reads the whole response from a connection made by [`send`].
pub fn read_response(stream: TcpStream) -> io::Result<Response> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("no status line"))?;
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| invalid("bad header"))?;
        headers.insert(k.to_ascii_lowercase(), v.trim().to_string());
    }
    let mut raw = Vec::new();
    reader.read_to_end(&mut raw)?;
    let body = if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        dechunk(&raw)?
    } else {
        raw
    };
    Ok(Response {
        status,
        headers,
        body: String::from_utf8(body).map_err(|_| invalid("body is not UTF-8"))?,
    })
}

fn dechunk(mut raw: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| invalid("truncated chunk"))?;
        let size = std::str::from_utf8(&raw[..end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .ok_or_else(|| invalid("bad chunk size"))?;
        if size == 0 {
            return Ok(out);
        }
        let data = raw
            .get(end + 2..end + 2 + size)
            .ok_or_else(|| invalid("truncated chunk"))?;
        out.extend_from_slice(data);
        raw = raw.get(end + 4 + size..).unwrap_or_default();
    }
}

/// [`send`] then [`read_response`].
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> io::Result<Response> {
    read_response(send(addr, method, path, key, body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined_and_truncation_is_an_error() {
        let raw = b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n";
        assert_eq!(dechunk(raw).unwrap(), b"hello!");
        assert!(dechunk(b"5\r\nhel").is_err());
        assert!(dechunk(b"zz\r\nhello\r\n").is_err());
    }
}
