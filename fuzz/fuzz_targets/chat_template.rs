//! Chat templates (`tokenizer_config.json`'s Jinja): any template and any messages give text or
//! an error — never a panic, and never a hang (the render's work is bounded by its fuel).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peft_models::chat::{ChatTemplate, Message};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The template, then `role: content` lines after the first NUL.
    let (source, rest) = text.split_once('\0').unwrap_or((text, "user: hi"));
    let messages: Vec<Message> = rest
        .lines()
        .map(|l| {
            let (role, content) = l.split_once(':').unwrap_or(("user", l));
            Message::new(role, content)
        })
        .collect();
    if let Ok(template) = ChatTemplate::new(source, Some("<s>"), Some("</s>")) {
        let _ = template.render(&messages, true);
        let _ = template.assistant_segments(&messages);
    }
});
