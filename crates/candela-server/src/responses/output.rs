//! From the engine's deltas to the Responses API's output: the items (`message`,
//! `function_call`) in the order the model wrote them, and the events that stream them.
//!
//! A non-streamed answer runs the same [`Assembler`] and keeps only the final response, so
//! both modes give the same output. The events of one response, in order:
//!
//! ```text
//! response.created, response.in_progress
//! per message:  output_item.added, content_part.added, output_text.delta*,
//!               output_text.done, content_part.done, output_item.done
//! per call:     output_item.added, function_call_arguments.delta*,
//!               function_call_arguments.done, output_item.done
//! response.completed (status completed, incomplete or cancelled) | response.failed
//! ```
//!
//! Text that is only whitespace is held back until something else follows: before a call it
//! is dropped (a model often writes a newline before its call marker), so an answer that is
//! only calls has no empty message, streamed or not.

use candela_engine::api::{FinishReason, ToolCallDelta};

use super::wire::{
    EventBody, IncompleteDetails, InputTokensDetails, OutputItem, OutputText, OutputTokensDetails,
    ResponseErrorOut, ResponseObject, ResponseUsage, StreamEvent,
};
use crate::error::ApiError;
use crate::generate::Delta;
use crate::openai::{TimingsOut, UsageOut};

/// Which item at the end of `output` is still being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    /// A message: text deltas go to it.
    Message,
    /// A function call: argument pieces of the engine's call `index` go to it.
    Call {
        /// The call's index among the choice's calls (the engine's numbering).
        index: u32,
    },
}

/// Builds one response and its events from the engine's deltas.
#[derive(Debug)]
pub struct Assembler {
    response: ResponseObject,
    open: Option<Open>,
    /// Whitespace not shown yet (see the module doc).
    held: String,
    /// The next event's `sequence_number`.
    sequence: u32,
    events: Vec<StreamEvent>,
    /// Set by `finish` or `fail`: no event follows.
    done: bool,
}

impl Assembler {
    /// Starts a response from its skeleton (ids, model and the request's settings echoed),
    /// with `response.created` and `response.in_progress`.
    pub fn new(mut response: ResponseObject) -> Self {
        response.status = "in_progress";
        response.output.clear();
        let mut out = Self {
            response,
            open: None,
            held: String::new(),
            sequence: 0,
            events: Vec::new(),
            done: false,
        };
        out.push_response("response.created");
        out.push_response("response.in_progress");
        out
    }

    /// The events so far, emptied.
    pub fn take_events(&mut self) -> Vec<StreamEvent> {
        std::mem::take(&mut self.events)
    }

    /// Whether the last event has been made.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The response as it stands (final after `finish`).
    pub fn into_response(self) -> ResponseObject {
        self.response
    }

    fn push(&mut self, kind: &'static str, body: EventBody) {
        self.events.push(StreamEvent {
            kind,
            sequence_number: self.sequence,
            body,
        });
        self.sequence += 1;
    }

    fn push_response(&mut self, kind: &'static str) {
        let response = Box::new(self.response.clone());
        self.push(kind, EventBody::Response { response });
    }

    /// Position of the last item of `output`, the open one.
    fn last_index(&self) -> u32 {
        self.response.output.len().saturating_sub(1) as u32
    }

    /// Applies one delta of the (only) choice.
    pub fn delta(&mut self, delta: &Delta) {
        if self.done {
            return;
        }
        // Within one delta, text comes before the calls: the parser releases the text that
        // precedes a call marker before the call itself.
        self.text(&delta.text);
        for call in &delta.tool_calls {
            self.tool_call(call);
        }
    }

    fn text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if self.open == Some(Open::Message) {
            self.append_text(text.to_owned());
            return;
        }
        self.held.push_str(text);
        if self.held.trim().is_empty() {
            return;
        }
        self.close("completed");
        self.open_message();
        let held = std::mem::take(&mut self.held);
        self.append_text(held);
    }

    fn open_message(&mut self) {
        let output_index = self.response.output.len() as u32;
        let id = new_id("msg");
        let item = |content| OutputItem::Message {
            id: id.clone(),
            status: "in_progress",
            role: "assistant",
            content,
        };
        self.push(
            "response.output_item.added",
            EventBody::Item {
                output_index,
                item: item(Vec::new()),
            },
        );
        self.push(
            "response.content_part.added",
            EventBody::Part {
                item_id: id.clone(),
                output_index,
                content_index: 0,
                part: OutputText::new(String::new()),
            },
        );
        self.response
            .output
            .push(item(vec![OutputText::new(String::new())]));
        self.open = Some(Open::Message);
    }

    fn append_text(&mut self, delta: String) {
        let output_index = self.last_index();
        let Some(OutputItem::Message { id, content, .. }) = self.response.output.last_mut() else {
            return;
        };
        let item_id = id.clone();
        if let Some(part) = content.first_mut() {
            part.text.push_str(&delta);
        }
        self.push(
            "response.output_text.delta",
            EventBody::TextDelta {
                item_id,
                output_index,
                content_index: 0,
                delta,
                logprobs: Vec::new(),
            },
        );
    }

    fn tool_call(&mut self, piece: &ToolCallDelta) {
        if let Some(call_id) = &piece.id {
            // A new call: what came before it is complete, and whitespace before it is dropped.
            self.close("completed");
            self.held.clear();
            let output_index = self.response.output.len() as u32;
            let item = OutputItem::FunctionCall {
                id: new_id("fc"),
                call_id: call_id.clone(),
                name: piece.name.clone().unwrap_or_default(),
                arguments: String::new(),
                status: "in_progress",
            };
            self.push(
                "response.output_item.added",
                EventBody::Item {
                    output_index,
                    item: item.clone(),
                },
            );
            self.response.output.push(item);
            self.open = Some(Open::Call { index: piece.index });
        }
        if piece.arguments.is_empty() {
            return;
        }
        if self.open != Some(Open::Call { index: piece.index }) {
            // The engine finishes one call before it starts the next; a piece of another call
            // would be an engine bug, and is dropped rather than put into the wrong call.
            tracing::error!(index = piece.index, "arguments of a call that is not open");
            return;
        }
        let output_index = self.last_index();
        let Some(OutputItem::FunctionCall { id, arguments, .. }) = self.response.output.last_mut()
        else {
            return;
        };
        arguments.push_str(&piece.arguments);
        let item_id = id.clone();
        self.push(
            "response.function_call_arguments.delta",
            EventBody::ArgumentsDelta {
                item_id,
                output_index,
                delta: piece.arguments.clone(),
            },
        );
    }

    /// Finishes the open item with `status`, with its `*.done` events.
    fn close(&mut self, status: &'static str) {
        let Some(open) = self.open.take() else {
            return;
        };
        let output_index = self.last_index();
        let Some(item) = self.response.output.last_mut() else {
            return;
        };
        match item {
            OutputItem::Message { status: s, .. } | OutputItem::FunctionCall { status: s, .. } => {
                *s = status
            }
        }
        let item = item.clone();
        match (open, &item) {
            (Open::Message, OutputItem::Message { id, content, .. }) => {
                let part = content
                    .first()
                    .cloned()
                    .unwrap_or_else(|| OutputText::new(String::new()));
                self.push(
                    "response.output_text.done",
                    EventBody::TextDone {
                        item_id: id.clone(),
                        output_index,
                        content_index: 0,
                        text: part.text.clone(),
                        logprobs: Vec::new(),
                    },
                );
                self.push(
                    "response.content_part.done",
                    EventBody::Part {
                        item_id: id.clone(),
                        output_index,
                        content_index: 0,
                        part,
                    },
                );
            }
            (
                Open::Call { .. },
                OutputItem::FunctionCall {
                    id,
                    name,
                    arguments,
                    ..
                },
            ) => self.push(
                "response.function_call_arguments.done",
                EventBody::ArgumentsDone {
                    item_id: id.clone(),
                    output_index,
                    name: name.clone(),
                    arguments: arguments.clone(),
                },
            ),
            _ => {}
        }
        self.push(
            "response.output_item.done",
            EventBody::Item { output_index, item },
        );
    }

    /// Ends the response: the open item is done, the status set, usage and timings filled,
    /// and the last event made.
    pub fn finish(&mut self, reason: &FinishReason, usage: UsageOut, timings: TimingsOut) {
        if self.done {
            return;
        }
        let (status, item_status) = match reason {
            FinishReason::Stop(_) | FinishReason::ToolCalls => ("completed", "completed"),
            FinishReason::Length => ("incomplete", "incomplete"),
            FinishReason::Abort => ("cancelled", "incomplete"),
            FinishReason::Error(_) => ("failed", "incomplete"),
        };
        if self.response.output.is_empty() && status != "failed" {
            // No text and no call: an empty message, as OpenAI answers.
            self.open_message();
            let held = std::mem::take(&mut self.held);
            if !held.is_empty() {
                self.append_text(held);
            }
        }
        self.close(item_status);
        self.response.status = status;
        self.response.usage = Some(ResponseUsage {
            input_tokens: usage.prompt_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens: usage.prompt_tokens_details.cached_tokens,
                cache_write_tokens: 0,
            },
            output_tokens: usage.completion_tokens,
            output_tokens_details: OutputTokensDetails::default(),
            total_tokens: usage.total_tokens,
        });
        self.response.timings = Some(timings);
        match reason {
            FinishReason::Length => {
                self.response.incomplete_details = Some(IncompleteDetails {
                    reason: "max_output_tokens",
                });
            }
            FinishReason::Error(message) => {
                self.response.error = Some(ResponseErrorOut {
                    code: "server_error",
                    message: message.clone(),
                });
            }
            FinishReason::Stop(_) | FinishReason::ToolCalls => {
                self.response.completed_at = Some(crate::app::unix_now_s());
            }
            FinishReason::Abort => {}
        }
        // An incomplete response ends with `response.completed` too (its status says so), as
        // vLLM and llama.cpp send it: the SDK's stream helper takes its final response only
        // from that event.
        let kind = if status == "failed" {
            "response.failed"
        } else {
            "response.completed"
        };
        self.push_response(kind);
        self.done = true;
    }

    /// Ends a stream that broke after its headers went out: an `error` event, then nothing.
    pub fn fail(&mut self, error: &ApiError) {
        if self.done {
            return;
        }
        let detail = error.body().error;
        self.push(
            "error",
            EventBody::Error {
                code: detail.code.or(Some(detail.kind)),
                message: detail.message,
                param: detail.param,
            },
        );
        self.done = true;
    }
}

/// `msg_...` / `fc_...` / `resp_...`: a prefix and 32 hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candela_engine::api::StopCause;
    use serde_json::{json, Value};

    fn skeleton() -> ResponseObject {
        ResponseObject {
            id: "resp_1".into(),
            object: "response",
            created_at: 1,
            status: "in_progress",
            completed_at: None,
            error: None,
            incomplete_details: None,
            instructions: None,
            max_output_tokens: None,
            metadata: json!({}),
            model: "m".into(),
            output: Vec::new(),
            parallel_tool_calls: true,
            previous_response_id: None,
            reasoning: None,
            store: false,
            temperature: 1.0,
            top_p: 1.0,
            text: json!({"format": {"type": "text"}}),
            tool_choice: json!("auto"),
            tools: Vec::new(),
            truncation: "disabled",
            usage: None,
            user: None,
            background: false,
            timings: None,
        }
    }

    fn text(t: &str) -> Delta {
        Delta::for_test(t, Vec::new())
    }

    fn call(index: u32, first: Option<(&str, &str)>, arguments: &str) -> ToolCallDelta {
        ToolCallDelta {
            index,
            id: first.map(|(id, _)| id.to_owned()),
            name: first.map(|(_, name)| name.to_owned()),
            arguments: arguments.to_owned(),
        }
    }

    fn eos() -> FinishReason {
        FinishReason::Stop(StopCause::Eos(2))
    }

    fn usage() -> UsageOut {
        UsageOut {
            prompt_tokens: 5,
            completion_tokens: 3,
            total_tokens: 8,
            ..UsageOut::default()
        }
    }

    /// Every event as JSON, checking the sequence numbers count up from 0.
    fn events_of(out: &mut Assembler) -> Vec<Value> {
        let events = out.take_events();
        events
            .iter()
            .map(|e| serde_json::to_value(e).unwrap_or_default())
            .collect()
    }

    fn kinds(events: &[Value]) -> Vec<&str> {
        events.iter().filter_map(|e| e["type"].as_str()).collect()
    }

    #[test]
    fn a_text_answer_streams_one_message() {
        let mut out = Assembler::new(skeleton());
        out.delta(&text("Hel"));
        out.delta(&text("lo"));
        out.finish(&eos(), usage(), TimingsOut::default());
        let events = events_of(&mut out);
        assert_eq!(
            kinds(&events),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e["sequence_number"], i);
        }
        assert_eq!(events[0]["response"]["status"], "in_progress");
        assert_eq!(events[0]["response"]["output"], json!([]));
        assert_eq!(events[2]["item"]["content"], json!([]));
        assert_eq!(events[4]["delta"], "Hel");
        assert_eq!(events[4]["logprobs"], json!([]));
        assert_eq!(events[6]["text"], "Hello");
        let item_id = events[2]["item"]["id"].clone();
        assert!(item_id.as_str().is_some_and(|id| id.starts_with("msg_")));
        for e in &events[3..8] {
            assert_eq!(e["item_id"], item_id);
            assert_eq!(e["output_index"], 0);
        }
        let done = &events[9]["response"];
        assert_eq!(done["status"], "completed");
        assert!(done["completed_at"].is_u64());
        assert_eq!(done["usage"]["input_tokens"], 5);
        assert_eq!(
            done["usage"]["output_tokens_details"]["reasoning_tokens"],
            0
        );
        assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(done["output"][0]["status"], "completed");
        assert_eq!(done["output"], json!([events[8]["item"]]));
    }

    #[test]
    fn calls_after_whitespace_have_no_message() {
        let mut out = Assembler::new(skeleton());
        out.delta(&text("\n"));
        out.delta(&Delta::for_test(
            "",
            vec![call(0, Some(("call_a", "f")), ""), call(0, None, "{\"x\":")],
        ));
        out.delta(&Delta::for_test("", vec![call(0, None, "1}")]));
        out.delta(&Delta::for_test(
            "",
            vec![call(1, Some(("call_b", "g")), ""), call(1, None, "{}")],
        ));
        out.finish(&FinishReason::ToolCalls, usage(), TimingsOut::default());
        let events = events_of(&mut out);
        assert_eq!(
            kinds(&events)[2..],
            [
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        assert_eq!(events[2]["item"]["arguments"], "");
        assert_eq!(events[2]["item"]["status"], "in_progress");
        assert_eq!(events[5]["arguments"], "{\"x\":1}");
        assert_eq!(events[5]["name"], "f");
        assert_eq!(events[7]["output_index"], 1);
        let response = out.into_response();
        let output = serde_json::to_value(&response.output).unwrap_or_default();
        assert_eq!(output[0]["type"], "function_call");
        assert_eq!(output[0]["call_id"], "call_a");
        assert_eq!(output[0]["arguments"], "{\"x\":1}");
        assert_eq!(output[0]["status"], "completed");
        assert!(output[0]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("fc_")));
        assert_eq!(output[1]["call_id"], "call_b");
        assert_eq!(output.as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn text_before_a_call_is_its_own_message() {
        let mut out = Assembler::new(skeleton());
        out.delta(&Delta::for_test(
            "Let me check.",
            vec![call(0, Some(("call_a", "f")), "{}")],
        ));
        out.finish(&FinishReason::ToolCalls, usage(), TimingsOut::default());
        let response = out.into_response();
        assert_eq!(response.output.len(), 2);
        assert!(matches!(&response.output[0],
            OutputItem::Message { content, status: "completed", .. } if content[0].text == "Let me check."));
        assert!(
            matches!(&response.output[1], OutputItem::FunctionCall { call_id, .. } if call_id == "call_a")
        );
    }

    #[test]
    fn the_length_limit_is_incomplete_and_nothing_is_an_empty_message() {
        let mut out = Assembler::new(skeleton());
        out.delta(&text("abc"));
        out.finish(&FinishReason::Length, usage(), TimingsOut::default());
        let events = events_of(&mut out);
        let last = &events[events.len() - 1];
        assert_eq!(last["type"], "response.completed");
        assert_eq!(last["response"]["status"], "incomplete");
        assert_eq!(
            last["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
        assert_eq!(last["response"]["output"][0]["status"], "incomplete");
        assert!(last["response"]["completed_at"].is_null());

        let mut empty = Assembler::new(skeleton());
        empty.delta(&text(" "));
        empty.finish(&eos(), usage(), TimingsOut::default());
        let response = empty.into_response();
        assert!(matches!(&response.output[..],
            [OutputItem::Message { content, .. }] if content[0].text == " "));
    }

    #[test]
    fn an_engine_error_fails_the_response_and_a_broken_stream_ends_with_error() {
        let mut out = Assembler::new(skeleton());
        out.finish(
            &FinishReason::Error("boom".into()),
            usage(),
            TimingsOut::default(),
        );
        let events = events_of(&mut out);
        let last = &events[events.len() - 1];
        assert_eq!(last["type"], "response.failed");
        assert_eq!(last["response"]["error"]["message"], "boom");
        assert!(out.is_done());

        let mut broken = Assembler::new(skeleton());
        broken.delta(&text("a"));
        broken.fail(&ApiError::Internal("secret".into()));
        broken.delta(&text("b"));
        let events = events_of(&mut broken);
        let last = &events[events.len() - 1];
        assert_eq!(last["type"], "error");
        assert_eq!(last["message"], "internal server error");
        assert_eq!(last["sequence_number"], events.len() - 1);
    }
}
