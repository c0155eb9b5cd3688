//! Chat templates rendered the way `transformers` renders them. Expected strings for the
//! hand-written templates were produced by Jinja2 with transformers' settings
//! (`trim_blocks`, `lstrip_blocks`, loop controls, its `tojson` and `raise_exception`).

use candela_models::chat_template::{
    ChatMessage, ChatTemplate, ContentPart, MessageContent, TemplateError,
};

fn render(source: &str, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let template = ChatTemplate::new(source, Some("<s>"), Some("</s>")).expect("compiles");
    template
        .render(messages, add_generation_prompt)
        .expect("renders")
}

const LLAMA3: &str = r#"{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'user' or message.role == 'assistant') %}
        {{- raise_exception("Only user and assistant roles are supported after the system message!") }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

#[test]
fn llama3_style_template_matches_jinja2() {
    let template =
        ChatTemplate::new(LLAMA3, Some("<|begin_of_text|>"), Some("<|eot_id|>")).expect("compiles");
    let messages = [
        ChatMessage::new("system", "  Be brief. "),
        ChatMessage::new("user", "Hi there\n"),
        ChatMessage::new("assistant", "Hello!"),
        ChatMessage::new("user", "Bye"),
    ];
    assert_eq!(
        template.render(&messages, true).expect("renders"),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn raise_exception_becomes_a_raised_error_with_its_message() {
    let template = ChatTemplate::new(LLAMA3, None, None).expect("compiles");
    let err = template
        .render(&[ChatMessage::new("tool", "42")], false)
        .expect_err("the template rejects the tool role");
    match &err {
        TemplateError::Raised { message } => assert_eq!(
            message,
            "Only user and assistant roles are supported after the system message!"
        ),
        other => panic!("expected Raised, got {other:?}"),
    }
    assert!(err.to_string().contains("Only user and assistant roles"));
}

#[test]
fn a_template_bug_is_a_render_error_not_a_raise() {
    let template =
        ChatTemplate::new("{{ messages[0].content + 1 }}", None, None).expect("compiles");
    let err = template
        .render(&[ChatMessage::new("user", "x")], false)
        .expect_err("string + int fails");
    assert!(matches!(err, TemplateError::Render { .. }), "{err:?}");
}

#[test]
fn bad_syntax_is_a_syntax_error() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.role }}", None, None)
        .expect_err("unclosed for");
    assert!(matches!(err, TemplateError::Syntax { .. }), "{err:?}");
}

#[test]
fn trim_and_lstrip_blocks_and_python_methods() {
    let source = "{% for m in messages %}\n  {% if m.role == 'user' %}\n    U: {{ m.content.strip().upper() }}\n  {% else %}\n    A: {{ m.content }}\n  {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}";
    let messages = [
        ChatMessage::new("user", "  hi "),
        ChatMessage::new("assistant", "yo"),
    ];
    assert_eq!(render(source, &messages, true), "    U: HI\n    A: yo\nA:");
    assert_eq!(render(source, &messages, false), "    U: HI\n    A: yo\n");
}

#[test]
fn bos_and_eos_tokens_are_variables() {
    let messages = [ChatMessage::new("user", "q")];
    assert_eq!(
        render(
            "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
            &messages,
            false
        ),
        "<s>q</s>"
    );
    let none = ChatTemplate::new("[{{ bos_token }}]", None, None).expect("compiles");
    assert_eq!(none.render(&messages, false).expect("renders"), "[]");
}

#[test]
fn tojson_writes_python_json() {
    let messages = [ChatMessage::new("user", "é\"x\n")];
    assert_eq!(
        render("{{ messages | tojson }}", &messages, false),
        r#"[{"role": "user", "content": "é\"x\n"}]"#
    );
    assert_eq!(
        render("{{ messages[0] | tojson(indent=2) }}", &messages, false),
        "{\n  \"role\": \"user\",\n  \"content\": \"é\\\"x\\n\"\n}"
    );
    assert_eq!(
        render(
            "{{ {'b': [1, 2.5, none, true], 'a': {}} | tojson }}",
            &messages,
            false
        ),
        r#"{"b": [1, 2.5, null, true], "a": {}}"#
    );
    assert_eq!(
        render(
            "{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}",
            &messages,
            false
        ),
        r#"{"a": 2, "b": 1}"#
    );
}

#[test]
fn loop_controls_work() {
    let source = "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.role }};{% endfor %}";
    let messages = [
        ChatMessage::new("system", "s"),
        ChatMessage::new("user", "u"),
        ChatMessage::new("assistant", "a"),
    ];
    assert_eq!(render(source, &messages, false), "user;");
}

#[test]
fn strftime_now_gives_the_current_date() {
    let year: u32 = render("{{ strftime_now('%Y') }}", &[], false)
        .parse()
        .expect("a year");
    assert!((2024..3000).contains(&year), "{year}");
    let date = render("{{ strftime_now('%d %b %Y') }}", &[], false);
    assert_eq!(date.len(), 11, "{date}");
}

#[test]
fn content_parts_are_joined_for_string_templates() {
    let smol = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}";
    let message = ChatMessage::with_content(
        "user",
        MessageContent::Parts(vec![
            ContentPart::Text("first".to_owned()),
            ContentPart::Text("second".to_owned()),
        ]),
    );
    assert_eq!(
        render(smol, &[message], false),
        "<|im_start|>user\nfirst\nsecond<|im_end|>\n"
    );
}

#[test]
fn content_parts_are_passed_to_templates_that_iterate_them() {
    let typed = "{% for m in messages %}{% if m.content is string %}S:{{ m.content }}{% else %}{% for p in m.content %}[{{ p.type }}:{{ p.text }}]{% endfor %}{% endif %}{% endfor %}";
    let parts = ChatMessage::with_content(
        "user",
        MessageContent::Parts(vec![
            ContentPart::Text("a".to_owned()),
            ContentPart::Text("b".to_owned()),
        ]),
    );
    let text = ChatMessage::new("user", "c");
    assert_eq!(render(typed, &[parts, text], false), "[text:a][text:b]S:c");
}

#[test]
fn generation_tags_render_nothing() {
    let source =
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}";
    assert_eq!(
        render(source, &[ChatMessage::new("assistant", "ok")], false),
        "ok"
    );
}

#[test]
fn tokenizer_config_json_supplies_template_and_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokenizer_config.json");
    let config = serde_json::json!({
        "bos_token": {"content": "<s>", "lstrip": false},
        "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}
        ]
    });
    std::fs::write(&path, config.to_string()).expect("write config");
    let template = ChatTemplate::from_tokenizer_config(&path)
        .expect("loads")
        .expect("has a template");
    assert_eq!(
        template
            .render(&[ChatMessage::new("user", "hi")], false)
            .expect("renders"),
        "<s>hi</s>"
    );

    std::fs::write(&path, r#"{"eos_token": "</s>"}"#).expect("write config");
    assert!(ChatTemplate::from_tokenizer_config(&path)
        .expect("loads")
        .is_none());

    std::fs::write(&path, r#"{"chat_template": 3}"#).expect("write config");
    assert!(matches!(
        ChatTemplate::from_tokenizer_config(&path),
        Err(TemplateError::InvalidSource { .. })
    ));
}

#[test]
fn chat_template_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChatTemplate>();
}
