//! `candela chat` as a user runs it, with stdin piped: messages, commands and EOF.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn model_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn chat(stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_candela"))
        .arg("chat")
        .arg("--model")
        .arg(model_path())
        .args(["--temperature", "0", "--max-tokens", "12"])
        .args(["--kv-cache-memory-mib", "32"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    // Dropping stdin above closed it: the chat sees EOF after the last line.
    child.wait_with_output().expect("the chat exits")
}

/// The transcript as (reply, stats) pairs and command acknowledgements, in order.
fn lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn is_stats(line: &str) -> bool {
    line.starts_with('[') && line.contains("tokens, TTFT ") && line.contains("tokens/s")
}

/// The reply text before each stats line.
fn replies(lines: &[String]) -> Vec<String> {
    let mut replies = Vec::new();
    let mut current = Vec::new();
    for line in lines {
        if is_stats(line) {
            replies.push(current.join("\n"));
            current.clear();
        } else if line.starts_with('[') {
            current.clear();
        } else {
            current.push(line.clone());
        }
    }
    replies
}

#[test]
fn a_piped_session_with_commands_ends_cleanly_at_eof() {
    let output = chat("What is the capital of France?\n/system You answer in one word.\nHello\n/reset\nWhat is the capital of France?\n");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let lines = lines(&output);
    let transcript = lines.join("\n");
    assert_eq!(
        lines.iter().filter(|l| is_stats(l)).count(),
        3,
        "one stats line per reply: {transcript}"
    );
    let set = lines
        .iter()
        .position(|l| l == "[system prompt set; conversation reset]")
        .unwrap_or_else(|| panic!("no /system acknowledgement: {transcript}"));
    let reset = lines
        .iter()
        .position(|l| l == "[conversation reset]")
        .unwrap_or_else(|| panic!("no /reset acknowledgement: {transcript}"));
    assert!(set < reset, "{transcript}");
    let replies = replies(&lines);
    assert_eq!(replies.len(), 3, "{transcript}");
    assert!(replies.iter().all(|r| !r.trim().is_empty()), "{transcript}");
}

#[test]
fn reset_forgets_the_history_and_quit_ends_the_session() {
    // Greedy decoding: the same question on a fresh history gets the same reply; the same
    // question asked again without a reset sees the first exchange in its prompt.
    let output = chat("Name a color.\n/reset\nName a color.\n/quit\nThis line is never read.\n");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let lines = lines(&output);
    let replies = replies(&lines);
    assert_eq!(replies.len(), 2, "{}", lines.join("\n"));
    assert_eq!(replies[0], replies[1]);
}
