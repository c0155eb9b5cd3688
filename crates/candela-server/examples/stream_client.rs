//! A streaming chat client for `candela serve`, on nothing but tokio.
//!
//!     cargo run -p candela-server --example stream_client -- [http://127.0.0.1:8000] ["prompt"]
//!
//! Why a raw HTTP/1.1 reader instead of reqwest: reqwest is not in the dependency tree, and an
//! SSE stream over plain HTTP needs only a request line, headers and chunked decoding, which
//! fit in this file. Set `OPENAI_API_KEY` to send a Bearer key.

use std::io::Write;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

type Error = Box<dyn std::error::Error>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8000".to_owned());
    let prompt = args
        .next()
        .unwrap_or_else(|| "Write a haiku about the sea.".to_owned());
    let authority = base
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?
        .trim_end_matches('/');

    let body = serde_json::json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 128,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let auth = std::env::var("OPENAI_API_KEY")
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Accept: text/event-stream\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(authority).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut reader = BufReader::new(stream);

    let mut status = String::new();
    reader.read_line(&mut status).await?;
    let mut chunked = false;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 || header == "\r\n" {
            break;
        }
        chunked |= header
            .to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked");
    }
    if !status.contains(" 200 ") {
        let mut rest = String::new();
        reader.read_to_string(&mut rest).await?;
        return Err(format!("{}: {rest}", status.trim()).into());
    }

    // Decode the chunked body into a byte stream, and split it into SSE lines as it comes.
    let mut pending = Vec::new();
    let mut stdout = std::io::stdout();
    loop {
        let data = if chunked {
            read_chunk(&mut reader).await?
        } else {
            read_some(&mut reader).await?
        };
        let Some(data) = data else { break };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(payload) = line.trim_end().strip_prefix("data: ") else {
                continue;
            };
            if payload == "[DONE]" {
                println!();
                return Ok(());
            }
            let chunk: serde_json::Value = serde_json::from_str(payload)?;
            if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
                print!("{text}");
                stdout.flush()?;
            }
            if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
                eprintln!("\n[usage] {usage}");
            }
            if let Some(timings) = chunk.get("timings") {
                eprintln!("\n[timings] {timings}");
            }
        }
    }
    Err("the stream ended without [DONE]".into())
}

/// One chunk of a chunked body; `None` at the last (empty) chunk.
async fn read_chunk(reader: &mut BufReader<TcpStream>) -> Result<Option<Vec<u8>>, Error> {
    let mut size_line = String::new();
    if reader.read_line(&mut size_line).await? == 0 {
        return Ok(None);
    }
    let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16)?;
    if size == 0 {
        return Ok(None);
    }
    let mut data = vec![0; size + 2]; // the chunk and its CRLF
    reader.read_exact(&mut data).await?;
    data.truncate(size);
    Ok(Some(data))
}

/// Whatever arrived of a body without chunked encoding; `None` at the end.
async fn read_some(reader: &mut BufReader<TcpStream>) -> Result<Option<Vec<u8>>, Error> {
    let mut data = vec![0; 4096];
    let n = reader.read(&mut data).await?;
    data.truncate(n);
    Ok((n > 0).then_some(data))
}
