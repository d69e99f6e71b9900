//! adapter_config.json parsing: any bytes give a config or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peft_core::MethodConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = peft_lora::LoraConfig::from_json(text, "fuzz") {
        let _ = config.validate("fuzz");
        let _ = config.targets("bloom");
        let _ = config.rank_and_alpha("transformer.h.0.self_attention.query_key_value");
    }
    if let Ok(config) = peft_ia3::Ia3Config::from_json(text, "fuzz") {
        let _ = config.validate("fuzz");
    }
    let _ = peft_core::config::from_json_lenient::<peft_core::ConfigHeader<peft_lora::LoraConfig>>(
        text,
        |_| {},
    );
});
