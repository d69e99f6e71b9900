//! GGUF export against files written by llama.cpp's own converters
//! (fixtures/make_gguf_fixtures.py: `convert_hf_to_gguf.py` and `convert_lora_to_gguf.py` of
//! llama-cpp-python 0.3.36's llama.cpp): every metadata key and value, every tensor's name,
//! dimensions, type and bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use peft_gguf::{ExportOptions, GgmlType, GgufFile, OutType, Value, export_lora, export_model};
use peft_tests::{adapter_dir, fixtures, model_dir};

fn reference(case: &str) -> GgufFile {
    GgufFile::open(fixtures().join("gguf").join(format!("{case}.gguf"))).unwrap()
}

/// Descriptive keys the converter derives from folder names and model cards (`general.name`,
/// `general.size_label`, `general.basename`, `general.base_model.*`, `general.tags`...): not
/// part of what llama.cpp reads to run the model, and not compared.
fn compared_metadata(file: &GgufFile) -> BTreeMap<String, Value> {
    const KEPT: [&str; 4] = [
        "general.architecture",
        "general.type",
        "general.file_type",
        "general.quantization_version",
    ];
    file.metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("general.") || KEPT.contains(&k.as_str()))
        .cloned()
        .collect()
}

fn assert_same_metadata(ours: &GgufFile, theirs: &GgufFile) {
    let (a, b) = (compared_metadata(ours), compared_metadata(theirs));
    let keys_a: Vec<_> = a.keys().collect();
    let keys_b: Vec<_> = b.keys().collect();
    assert_eq!(keys_a, keys_b, "metadata keys");
    for (k, v) in &b {
        assert_eq!(&a[k], v, "metadata `{k}`");
    }
}

/// Tensors by name: (dims, type, bytes).
fn tensors(file: &GgufFile) -> BTreeMap<String, (Vec<u64>, peft_gguf::GgmlType, Vec<u8>)> {
    file.tensors
        .iter()
        .map(|t| {
            let bytes = file.tensor_bytes(t).to_vec();
            (t.name.clone(), (t.dims.clone(), t.ggml_type, bytes))
        })
        .collect()
}

fn export(model: &Path, outtype: OutType, out: &Path) -> GgufFile {
    let options = ExportOptions {
        outtype,
        ..Default::default()
    };
    let mut calls = 0;
    export_model(model, out, &options, &mut |_, _| calls += 1).unwrap();
    let file = GgufFile::open(out).unwrap();
    assert_eq!(calls, file.tensors.len(), "one progress call per tensor");
    file
}

fn assert_model_matches(model: &Path, case: &str, outtype: OutType) {
    let dir = tempfile::tempdir().unwrap();
    let ours = export(model, outtype, &dir.path().join(format!("{case}.gguf")));
    let theirs = reference(case);
    assert_same_metadata(&ours, &theirs);
    let (a, b) = (tensors(&ours), tensors(&theirs));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{case}: names"
    );
    for (name, expected) in &b {
        let got = &a[name];
        assert_eq!(
            (&got.0, got.1),
            (&expected.0, expected.1),
            "{case}: `{name}` dims/type"
        );
        assert!(got.2 == expected.2, "{case}: `{name}` bytes differ");
    }
}

#[test]
fn llama_exports_as_the_converter_writes_it_in_every_outtype() {
    for (case, outtype) in [
        ("llama-tiny-f32", OutType::F32),
        ("llama-tiny-f16", OutType::F16),
        ("llama-tiny-bf16", OutType::Bf16),
        ("llama-tiny-q8_0", OutType::Q8_0),
    ] {
        assert_model_matches(&model_dir("llama-tiny"), case, outtype);
    }
}

#[test]
fn each_architecture_exports_as_the_converter_writes_it() {
    for model in [
        "mistral-tiny",
        "qwen2-tiny",
        "qwen3-tiny",
        "bloom-tiny",
        "llama-rope-linear",
        "llama-rope-yarn",
        "llama-rope-llama3",
    ] {
        assert_model_matches(&model_dir(model), &format!("{model}-f16"), OutType::F16);
    }
    // Phi-3: the converter's file is of phi3-tiny with `tokenizer_class: GPT2Tokenizer` (as
    // Phi-4's; for another class it reads a tokenizer.model), which this exporter does not
    // read: the byte-level BPE vocabulary is written either way.
    assert_model_matches(&model_dir("phi3-tiny"), "phi3-gpt2-f16", OutType::F16);
}

/// Phi-3 with LongRoPE (the fixture script's `phi3-longrope`: phi3-tiny's context stretched
/// 4× over 64 positions): the converter's `rope_factors_long` / `_short` tensors and attention
/// factor, √(1 + ln 4 / ln 64); the import refuses the file by name (peft-models does not run
/// LongRoPE).
#[test]
fn phi3_longrope_exports_its_factors() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("phi3-longrope");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(model_dir("phi3-tiny")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    let cfg_path = model.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rope_parameters"] = serde_json::json!({
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "long_factor": [1.0, 1.5, 2.5, 4.0], "short_factor": [1.0, 1.1, 1.2, 1.3],
    });
    cfg["original_max_position_embeddings"] = 64.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_model_matches(&model, "phi3-longrope-f16", OutType::F16);
    let theirs = reference("phi3-longrope-f16");
    let Some(Value::F32(factor)) = theirs.get("phi3.rope.scaling.attn_factor") else {
        panic!("no attention factor");
    };
    assert!((f64::from(*factor) - (1.0f64 + 4f64.ln() / 64f64.ln()).sqrt()).abs() < 1e-6);
    let err = peft_gguf::import_gguf(
        &fixtures().join("gguf/phi3-longrope-f16.gguf"),
        &dir.path().join("back"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("LongRoPE"), "{err}");
}

#[test]
fn the_chat_template_and_add_bos_flag_are_carried() {
    // llama-tiny with a chat template and `add_bos_token: true`, as the fixture script makes it.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("llama-chat");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(model_dir("llama-tiny")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    let cfg_path = model.join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let theirs = reference("llama-chat-f16");
    let template = theirs
        .get("tokenizer.chat_template")
        .unwrap()
        .as_str()
        .unwrap();
    cfg["chat_template"] = template.into();
    cfg["add_bos_token"] = true.into();
    cfg["add_eos_token"] = false.into();
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_model_matches(&model, "llama-chat-f16", OutType::F16);
    assert_eq!(
        theirs.get("tokenizer.ggml.add_bos_token"),
        Some(&Value::Bool(true))
    );
}

fn export_adapter(adapter: &str, base: &str, out: &Path) -> GgufFile {
    let options = ExportOptions {
        outtype: OutType::F32,
        ..Default::default()
    };
    export_lora(
        &adapter_dir(adapter),
        &model_dir(base),
        out,
        &options,
        &mut |_, _| {},
    )
    .unwrap();
    GgufFile::open(out).unwrap()
}

#[test]
fn lora_adapters_export_as_the_converter_writes_them() {
    for (adapter, base) in [
        ("lora-llama-emb", "llama-tiny"),
        ("lora-bloom", "bloom-tiny"),
        ("lora-qwen3", "qwen3-tiny"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ours = export_adapter(adapter, base, &dir.path().join("a.gguf"));
        let theirs = reference(adapter);
        assert_same_metadata(&ours, &theirs);
        assert_eq!(tensors(&ours), tensors(&theirs), "{adapter}");
    }
}

/// `lora-llama` is rsLoRA (`lora_alpha` 16, r 4) with `alpha_pattern: {o_proj: 4}` and
/// `rank_pattern: {v_proj: 2}`. PEFT scales a pair by alpha / √r; llama.cpp by
/// `adapter.lora.alpha / rank`. The converter writes the pairs as they are, so llama.cpp would
/// apply other updates than PEFT's; we fold PEFT's scale into `lora_b`, by hand:
/// q, k: (16/√4) / (16/4) = 2; o: (4/√4) / (16/4) = 0.5; v: (16/√2) / (16/2) = √2.
/// Everything else is the converter's, byte for byte.
#[test]
fn peft_scaling_is_folded_into_lora_b() {
    let dir = tempfile::tempdir().unwrap();
    let ours = export_adapter("lora-llama", "llama-tiny", &dir.path().join("a.gguf"));
    let theirs = reference("lora-llama");
    assert_same_metadata(&ours, &theirs);
    let (a, b) = (tensors(&ours), tensors(&theirs));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut folded = 0;
    for name in b.keys() {
        if !name.ends_with("lora_b") {
            assert_eq!(a[name], b[name], "{name}");
            continue;
        }
        let factor = match name.split('.').nth(2).unwrap() {
            "attn_q" | "attn_k" => 2.0,
            "attn_output" => 0.5,
            "attn_v" => 2f64.sqrt() as f32,
            other => panic!("unexpected {other}"),
        };
        let ours = ours.tensor_f32(name).unwrap();
        let theirs = theirs.tensor_f32(name).unwrap();
        assert!(theirs.iter().any(|v| *v != 0.0));
        for (o, t) in ours.iter().zip(&theirs) {
            assert_eq!(*o, t * factor, "{name}");
        }
        folded += 1;
    }
    assert_eq!(folded, 8, "four projections in each of two layers");
}

#[test]
fn what_llama_cpp_cannot_take_is_refused_with_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.gguf");
    let options = ExportOptions::default();
    for (adapter, needles) in [
        ("dora-llama", ["DoRA", "--merge"]),
        ("ia3-llama", ["peft_type `IA3`", "--merge"]),
    ] {
        let err = export_lora(
            &adapter_dir(adapter),
            &model_dir("llama-tiny"),
            &out,
            &options,
            &mut |_, _| {},
        )
        .unwrap_err()
        .to_string();
        assert!(needles.iter().all(|n| err.contains(n)), "{err}");
    }
    let err = export_model(&model_dir("gemma2-tiny"), &out, &options, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Gemma2ForCausalLM") && err.contains("sentencepiece"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written on refusal");
    let path: PathBuf = dir.path().into();
    assert_eq!(std::fs::read_dir(path).unwrap().count(), 0);
}

/// Every checkpoint tensor of `model` equals the imported folder's, value for value.
fn assert_same_weights(model: &str, imported: &Path) {
    let original = peft_tensors::TensorStore::open_model_dir(model_dir(model)).unwrap();
    let back = peft_tensors::TensorStore::open_model_dir(imported).unwrap();
    let mut compared = 0;
    for key in original.keys() {
        // BLOOM's tiny checkpoint saves the names with `transformer.`; a tied head has no key.
        let (a, shape_a) = original.f32(key).unwrap();
        let (b, shape_b) = back.f32(key).unwrap();
        assert_eq!(shape_a, shape_b, "{model}: {key}");
        assert!(a == b, "{model}: `{key}` values differ");
        compared += 1;
    }
    assert_eq!(compared, back.keys().count(), "{model}: tensor count");
}

/// GGUF → Hugging Face folder (`import_gguf`) undoes the export: from the f32 file llama.cpp's
/// converter wrote for Llama, and from our f32 exports of the other architectures (their
/// converter-made fixtures are f16, which rounds the weights), every weight back bit for bit,
/// transformers' logits, and a tokenizer giving the same ids.
#[test]
fn gguf_files_import_as_the_checkpoints_they_came_from() {
    let dir = tempfile::tempdir().unwrap();
    // A file llama.cpp's converter wrote: Q/K rows back in Hugging Face order, bit for bit.
    let from_converter = dir.path().join("llama-from-converter");
    peft_gguf::import_gguf(
        &fixtures().join("gguf/llama-tiny-f32.gguf"),
        &from_converter,
    )
    .unwrap();
    assert_same_weights("llama-tiny", &from_converter);
    let device = peft_tests::device();
    let model = peft_models::load(&from_converter, &device).unwrap();
    peft_tests::assert_logits_match(&model, "llama-tiny", 1e-4);

    for name in [
        "mistral-tiny",
        "qwen2-tiny",
        "qwen3-tiny",
        "bloom-tiny",
        "phi3-tiny",
    ] {
        let gguf = dir.path().join(format!("{name}.gguf"));
        export(&model_dir(name), OutType::F32, &gguf);
        let back = dir.path().join(name);
        peft_gguf::import_gguf(&gguf, &back).unwrap();
        assert_same_weights(name, &back);
        let model = peft_models::load(&back, &device).unwrap();
        // Mistral imports as Llama (GGUF has no sliding window): the fixture batch is longer
        // than its window of 4, so its logits are not compared here.
        if name != "mistral-tiny" {
            peft_tests::assert_logits_match(&model, name, 1e-4);
        }
        let (theirs, ours) = (
            peft_models::Tokenizer::from_dir(model_dir(name)).unwrap(),
            peft_models::Tokenizer::from_dir(&back).unwrap(),
        );
        for text in [
            "Hello, world!",
            "下面是人和聊天机器人的对话。",
            "  spaces\n\tand 123 😀",
        ] {
            assert_eq!(
                ours.encode(text).unwrap(),
                theirs.encode(text).unwrap(),
                "{name}: {text:?}"
            );
        }
    }
}

/// A Q8_0 file (llama.cpp's converter's) imports as its de-quantised values, within Q8_0's
/// step of the original weights, and runs.
#[test]
fn a_q8_0_gguf_imports_de_quantised() {
    let dir = tempfile::tempdir().unwrap();
    let back = dir.path().join("q8");
    peft_gguf::import_gguf(&fixtures().join("gguf/llama-tiny-q8_0.gguf"), &back).unwrap();
    let original = peft_tensors::TensorStore::open_model_dir(model_dir("llama-tiny")).unwrap();
    let imported = peft_tensors::TensorStore::open_model_dir(&back).unwrap();
    let (a, _) = original
        .f32("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    let (b, _) = imported
        .f32("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    // Per block of 32: |error| ≤ half a step (step = max|x| / 127), plus up to 127 codes times
    // the step's own f16 rounding (≤ 2^-11 of it).
    for (block_a, block_b) in a.chunks(32).zip(b.chunks(32)) {
        let step = block_a.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        for (x, y) in block_a.iter().zip(block_b) {
            assert!((x - y).abs() <= step * (0.5 + 127.0 / 2048.0), "{x} vs {y}");
        }
    }
    // It loads and runs (8-bit weights of this random tiny model move its logits by about 1).
    assert_runs(&back);
}

/// The imported folder loads and gives finite logits of the right shape on the Llama batch.
fn assert_runs(folder: &Path) {
    let model = peft_models::load(folder, &peft_tests::device()).unwrap();
    let reference = peft_tests::Reference::load("llama-tiny");
    let logits = peft_tests::logits(&model, &reference);
    assert_eq!(logits.len(), reference.logits.len());
    assert!(logits.iter().all(|v| v.is_finite()));
}

#[test]
fn what_cannot_be_imported_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let err = peft_gguf::import_gguf(&fixtures().join("gguf/lora-llama.gguf"), dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("LoRA adapter GGUF"), "{err}");
}

/// A Llama 3 file (the converter's, with `rope_freqs.weight`) imports with the RoPE parameters
/// of the checkpoint it came from (factor 8, low 1, high 4, original context 16: solved from
/// the factors), runs with its logits, and exports back to the same factors. Factors that are
/// not Llama 3's formula are refused by name.
#[test]
fn a_llama_3_gguf_imports_its_rope_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let back = dir.path().join("llama3");
    let file = fixtures().join("gguf/llama-rope-llama3-f16.gguf");
    peft_gguf::import_gguf(&file, &back).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap()).unwrap();
    let rope = &config["rope_parameters"];
    assert_eq!(rope["rope_type"], "llama3");
    assert_eq!(rope["factor"], 8.0);
    assert_eq!(rope["low_freq_factor"], 1.0);
    assert_eq!(rope["high_freq_factor"], 4.0);
    assert_eq!(rope["original_max_position_embeddings"], 16);
    let model = peft_models::load(&back, &peft_tests::device()).unwrap();
    // f16 weights: the fixture's f32 logits within f16's rounding of the weights.
    peft_tests::assert_logits_match(&model, "llama-rope-llama3", 2e-2);
    let again = dir.path().join("again.gguf");
    let exported = export(&back, OutType::F16, &again);
    let original = GgufFile::open(&file).unwrap();
    let factors = |f: &GgufFile| f.tensor_f32("rope_freqs.weight").unwrap();
    assert_eq!(factors(&exported), factors(&original));

    // The same model through an f32 file (ours, whose factors are the converter's bytes):
    // the checkpoint's logits to 1e-4.
    let f32_file = dir.path().join("llama3-f32.gguf");
    export(&model_dir("llama-rope-llama3"), OutType::F32, &f32_file);
    let f32_back = dir.path().join("llama3-f32");
    peft_gguf::import_gguf(&f32_file, &f32_back).unwrap();
    let model = peft_models::load(&f32_back, &peft_tests::device()).unwrap();
    peft_tests::assert_logits_match(&model, "llama-rope-llama3", 1e-4);

    let factors = factors(&original);
    let dim = 2 * factors.len();
    assert!(peft_gguf::arch::Llama3Rope::from_factors(&factors, 500000.0, dim).is_some());
    let mut bent = factors.clone();
    bent[0] *= 1.01;
    assert_eq!(
        peft_gguf::arch::Llama3Rope::from_factors(&bent, 500000.0, dim),
        None
    );
}

/// The encoders write llama.cpp's quantiser's bytes: the first rows of every matrix of the f32
/// file that `llama_model_quantize` read (`gguf/quant-source.safetensors`), encoded in each
/// type, equal the first bytes of that tensor in the quantiser's file — Q4_0, Q4_1, Q5_0, Q5_1
/// and the k-quants Q4_K, Q5_K and Q6_K, whose scale searches leave no rounding unexposed.
#[test]
fn quantisers_write_llama_cpp_quantize_bytes() {
    let source = safetensors_f32(&fixtures().join("gguf/quant-source.safetensors"));
    let mut checked = std::collections::BTreeSet::new();
    for (file, ggml_type) in [
        ("q4_0", GgmlType::Q4_0),
        ("q4_1", GgmlType::Q4_1),
        ("q5_0", GgmlType::Q5_0),
        ("q5_1", GgmlType::Q5_1),
        ("q4_k", GgmlType::Q4_K),
        ("q5_k", GgmlType::Q5_K),
        ("q6_k", GgmlType::Q6_K),
    ] {
        let theirs = reference(&format!("quant-{file}"));
        for (name, rows) in &source {
            let info = theirs.tensor(name).unwrap();
            assert_eq!(info.ggml_type, ggml_type, "{file} {name}");
            let ours = peft_gguf::quant::encode(ggml_type, rows).unwrap();
            let expected = &theirs.tensor_bytes(info)[..ours.len()];
            let first_diff = ours.iter().zip(expected).position(|(a, b)| a != b);
            assert_eq!(first_diff, None, "{file} {name}: bytes differ");
            checked.insert(name.clone());
        }
    }
    // q, k, v, o, gate, up, down and the (tied) token embedding.
    assert_eq!(checked.len(), 8, "{checked:?}");
}

/// Every tensor of a safetensors file as f32 values.
fn safetensors_f32(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let store = peft_tensors::TensorStore::open(path).unwrap();
    store
        .keys()
        .map(|k| (k.to_string(), store.f32(k).unwrap().0))
        .collect()
}

/// Files llama.cpp's quantiser wrote (`llama_model_quantize`, every matrix in one type: Q4_0,
/// Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) de-quantise to gguf-py's values bit for bit: the
/// SHA-256 of each tensor's f32 values against `gguf/quant.json` (make_gguf_fixtures.py).
#[test]
fn quantised_files_de_quantise_as_llama_cpp_does() {
    use sha2::Digest;
    let path = fixtures().join("gguf/quant.json");
    let hashes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut types = std::collections::BTreeSet::new();
    for (file, tensors) in hashes.as_object().unwrap() {
        let gguf = GgufFile::open(fixtures().join("gguf").join(file)).unwrap();
        for (name, expected) in tensors.as_object().unwrap() {
            let info = gguf.tensor(name).unwrap();
            let kind = format!("{:?}", info.ggml_type).to_uppercase();
            assert_eq!(kind, expected["type"].as_str().unwrap(), "{file} {name}");
            let bytes: Vec<u8> = gguf
                .tensor_f32(name)
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let hash: String = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(hash, expected["sha256"].as_str().unwrap(), "{file} {name}");
            types.insert(kind);
        }
    }
    assert_eq!(
        types.into_iter().collect::<Vec<_>>(),
        [
            "F32", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K"
        ]
    );
}

/// `--outtype q4_k_m` / `q5_k_m` on the 64-wide fixtures: every matrix takes the type
/// `llama_model_quantize` gave it in clients/llama_cpp_check.py (rows of 64 do not split into
/// 256-value super-blocks, so Q4_K falls back to Q5_0, Q5_K to Q5_1 and the Q6_K choices —
/// output, and value / FFN-down projections of the last of 2 blocks — to Q8_0), the file type is
/// llama.cpp's, and the file imports and runs.
#[test]
fn quantised_mixes_choose_llama_quantize_types() {
    use peft_gguf::mix::QuantMix;
    let dir = tempfile::tempdir().unwrap();
    for (model, mix, file_type, expected) in [
        (
            "llama-tiny",
            QuantMix::Q4_K_M,
            15,
            &[("F32", 5), ("Q5_0", 13), ("Q8_0", 3)][..],
        ),
        (
            "qwen2-tiny",
            QuantMix::Q5_K_M,
            17,
            &[("F32", 11), ("Q5_1", 12), ("Q8_0", 3)][..],
        ),
    ] {
        let out = dir.path().join(format!("{model}.gguf"));
        let file = export(&model_dir(model), OutType::Quantised(mix), &out);
        let mut counts = BTreeMap::new();
        for t in &file.tensors {
            *counts
                .entry(format!("{:?}", t.ggml_type).to_uppercase())
                .or_insert(0) += 1;
        }
        let expected: BTreeMap<String, i32> =
            expected.iter().map(|(k, n)| (k.to_string(), *n)).collect();
        assert_eq!(counts, expected, "{model} {mix:?}");
        assert_eq!(file.get("general.file_type"), Some(&Value::U32(file_type)));
        assert_eq!(
            file.tensor("blk.1.attn_v.weight").unwrap().ggml_type,
            GgmlType::Q8_0,
            "{model}: the last block's value projection gets Q6_K (then Q8_0 for 64-wide rows)"
        );
        if model == "llama-tiny" {
            let back = dir.path().join("back");
            peft_gguf::import_gguf(&out, &back).unwrap();
            assert_runs(&back);
        }
    }
    let err = "q3_k_m".parse::<OutType>().unwrap_err().to_string();
    assert!(err.contains("q4_k_m") && err.contains("q3_k_m"), "{err}");
}

/// A k-quant file imports (de-quantised to f32) and runs.
#[test]
fn a_k_quant_gguf_imports_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let back = dir.path().join("q4k");
    peft_gguf::import_gguf(&fixtures().join("gguf/quant-q4_k.gguf"), &back).unwrap();
    assert_runs(&back);
}

/// An adapter whose `lora_A` is missing beside a `lora_B` is refused by the key's name.
#[test]
fn a_lora_b_without_its_a_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("broken");
    std::fs::create_dir(&adapter).unwrap();
    let source = adapter_dir("lora-qwen3");
    std::fs::copy(
        source.join("adapter_config.json"),
        adapter.join("adapter_config.json"),
    )
    .unwrap();
    let store = peft_tensors::TensorStore::open(source.join("adapter_model.safetensors")).unwrap();
    let dropped = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
    assert!(store.contains(dropped));
    let kept: BTreeMap<String, peft_tensors::HostTensor> = store
        .keys()
        .filter(|k| *k != dropped)
        .map(|k| (k.to_string(), store.get(k).unwrap()))
        .collect();
    peft_tensors::save_safetensors(adapter.join("adapter_model.safetensors"), &kept, None).unwrap();
    let err = export_lora(
        &adapter,
        &model_dir("qwen3-tiny"),
        &dir.path().join("x.gguf"),
        &ExportOptions::default(),
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("layers.1.self_attn.q_proj.lora_B.weight") && err.contains("lora_A"),
        "{err}"
    );
}
