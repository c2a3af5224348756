use super::*;
use crate::testing::fixtures_dir;

/// A fresh empty folder under the system temp dir, unique to this test.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdlora-weights-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny_sd() -> PathBuf {
    fixtures_dir().join("tiny-sd")
}

#[test]
fn float_storage_types_convert_to_f32() {
    let f = SafetensorsFile::open(&fixtures_dir().join("dtypes.safetensors")).unwrap();
    let vals = [0.0f32, 1.0, -2.5, 3.140625, 1e-3, -65504.0, 1365.0 / 4096.0, 7.0];
    assert_eq!(f.raw("f32").unwrap().to_f32().unwrap(), vals);
    let want_f16: Vec<f32> = vals.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    assert_eq!(f.raw("f16").unwrap().to_f32().unwrap(), want_f16);
    let want_bf16: Vec<f32> = vals.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    assert_eq!(f.raw("bf16").unwrap().to_f32().unwrap(), want_bf16);
    let bits: Vec<u16> = vals.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    for key in ["f32", "bf16"] {
        assert_eq!(f.raw(key).unwrap().to_bf16_bits().unwrap(), bits, "{key} as bf16 bits");
    }
    let err = format!("{:#}", f.raw("i64").unwrap().to_f32().unwrap_err());
    assert!(err.contains("I64") && err.contains("\"i64\"") && err.contains("dtypes.safetensors"), "{err}");
}

#[test]
fn diffusers_folder_weights_check_shapes_and_name_the_file() {
    let src = ModelSource::resolve(tiny_sd().to_str().unwrap()).unwrap();
    let vae = src.weights(Component::Vae).unwrap();
    assert_eq!(vae.shape("encoder.mid_block.attentions.0.to_q.weight").unwrap(), &[32, 32]);
    let t = vae.tensor("encoder.conv_in.weight", &[16, 3, 3, 3]).unwrap();
    assert_eq!(t.shape(), &[16, 3, 3, 3]);
    let err = format!("{:#}", vae.vec("encoder.conv_in.weight", &[16, 3, 1, 1]).unwrap_err());
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && err.contains("[16, 3, 3, 3]") && err.contains("[16, 3, 1, 1]") && err.contains("encoder.conv_in.weight"),
        "{err}"
    );
    let err = format!("{:#}", vae.vec("encoder.no_such.weight", &[1]).unwrap_err());
    assert!(err.contains("encoder.no_such.weight") && err.contains("vae"), "{err}");
    assert!(src.config(Component::Vae).unwrap().unwrap()["block_out_channels"].is_array());
    assert!(src.tokenizer_dir().unwrap().join("vocab.json").is_file());
}

#[test]
fn conv_weights_are_reordered_to_ohwi() {
    let vae = Weights::from_component_dir(&tiny_sd().join("vae"), "fp16").unwrap();
    let oihw = vae.vec("encoder.conv_in.weight", &[16, 3, 3, 3]).unwrap();
    let ohwi = vae.conv_ohwi("encoder.conv_in.weight", 16, 3, 3).unwrap();
    // element (o=5, i=2, y=1, x=0)
    assert_eq!(ohwi[((5 * 3 + 1) * 3) * 3 + 2], oihw[((5 * 3 + 2) * 3 + 1) * 3]);
}

/// Every weight of every component, read from the single-file LDM checkpoint (f16) through the key
/// mapping, equals the diffusers folder's weight (rounded to f16) under the same name and shape.
#[test]
fn ldm_single_file_maps_to_the_diffusers_names() {
    let ldm = ModelSource::resolve(fixtures_dir().join("tiny-sd-ldm.safetensors").to_str().unwrap()).unwrap();
    let folder = ModelSource::resolve(tiny_sd().to_str().unwrap()).unwrap();
    assert!(ldm.config(Component::Unet).unwrap().is_none() && ldm.tokenizer_dir().is_none());
    for c in [Component::Unet, Component::Vae, Component::TextEncoder] {
        let (a, b) = (ldm.weights(c).unwrap(), folder.weights(c).unwrap());
        let names_a: Vec<&str> = a.names().collect();
        let names_b: Vec<&str> = b.names().filter(|n| !n.ends_with("position_ids")).collect();
        assert_eq!(names_a, names_b, "{c:?}: names differ");
        for name in names_b {
            let shape = b.shape(name).unwrap().to_vec();
            let want: Vec<f32> = b.vec(name, &shape).unwrap().iter().map(|&v| f16::from_f32(v).to_f32()).collect();
            assert_eq!(a.vec(name, &shape).unwrap(), want, "{c:?} {name}");
        }
    }
}

#[test]
fn ldm_keys_of_sd15() {
    let u = |k: &str| ldm_key(&format!("model.diffusion_model.{k}"), Component::Unet, 0).unwrap().unwrap();
    assert_eq!(u("input_blocks.4.0.skip_connection.weight"), "down_blocks.1.resnets.0.conv_shortcut.weight");
    assert_eq!(u("input_blocks.9.0.op.bias"), "down_blocks.2.downsamplers.0.conv.bias");
    assert_eq!(u("input_blocks.11.0.emb_layers.1.weight"), "down_blocks.3.resnets.1.time_emb_proj.weight");
    assert_eq!(u("middle_block.2.out_layers.3.weight"), "mid_block.resnets.1.conv2.weight");
    assert_eq!(u("output_blocks.2.1.conv.weight"), "up_blocks.0.upsamplers.0.conv.weight");
    assert_eq!(u("output_blocks.8.2.conv.bias"), "up_blocks.2.upsamplers.0.conv.bias");
    assert_eq!(
        u("output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"),
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"
    );
    let v = |k: &str| ldm_key(&format!("first_stage_model.{k}"), Component::Vae, 4).unwrap().unwrap();
    assert_eq!(v("decoder.up.0.block.2.nin_shortcut.weight"), "decoder.up_blocks.3.resnets.2.conv_shortcut.weight");
    assert_eq!(v("decoder.up.3.upsample.conv.weight"), "decoder.up_blocks.0.upsamplers.0.conv.weight");
    assert_eq!(v("encoder.mid.attn_1.proj_out.bias"), "encoder.mid_block.attentions.0.to_out.0.bias");
    let t = |k: &str| ldm_key(k, Component::TextEncoder, 0).unwrap();
    assert_eq!(t("cond_stage_model.transformer.embeddings.token_embedding.weight").unwrap(), "text_model.embeddings.token_embedding.weight");
    assert_eq!(t("cond_stage_model.transformer.text_model.embeddings.position_ids"), None);
    assert_eq!(t("model.diffusion_model.out.0.weight"), None);
    for bad in ["input_blocks.1.7.weight", "input_blocks.0.1.weight", "output_blocks.2.3.conv.weight", "label_emb.0.weight"] {
        let err = format!("{:#}", ldm_key(&format!("model.diffusion_model.{bad}"), Component::Unet, 0).unwrap_err());
        assert!(err.contains(bad), "{err}");
    }
    assert_eq!(legacy_vae_attention_name("decoder.mid_block.attentions.0.proj_attn.bias").unwrap(), "decoder.mid_block.attentions.0.to_out.0.bias");
}

#[test]
fn truncated_or_corrupt_files_are_errors() {
    let dir = scratch_dir("corrupt");
    let good = std::fs::read(tiny_sd().join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let cases: [(&str, Vec<u8>); 4] = [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("one_byte_short", good[..good.len() - 1].to_vec()),
        ("empty", Vec::new()),
        ("garbage", {
            let mut g = vec![0xFFu8; 64];
            g[..8].copy_from_slice(&40u64.to_le_bytes());
            g
        }),
    ];
    for (name, bytes) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        let err = format!("{:#}", SafetensorsFile::open(&path).err().expect(name));
        assert!(err.contains(&format!("{name}.safetensors")) && err.contains("truncated or corrupt"), "{name}: {err}");
    }
    std::fs::write(dir.join("model.ckpt"), b"pickle").unwrap();
    let err = format!("{:#}", ModelSource::resolve(dir.join("model.ckpt").to_str().unwrap()).err().unwrap());
    assert!(err.contains("model.ckpt") && err.contains("pickle"), "{err}");
    let err = format!("{:#}", SafetensorsFile::open(&dir.join("absent.safetensors")).err().unwrap());
    assert!(err.contains("absent.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn component_folder_prefers_plain_files_then_the_fp16_variant() {
    let dir = scratch_dir("variant");
    let src = tiny_sd().join("text_encoder/model.safetensors");
    std::fs::copy(&src, dir.join("model.fp16.safetensors")).unwrap();
    std::fs::copy(fixtures_dir().join("dtypes.safetensors"), dir.join("model.bf16.safetensors")).unwrap();
    let w = Weights::from_component_dir(&dir, "fp16").unwrap().with_prefix("text_model.");
    assert!(w.contains("text_model.final_layer_norm.weight"));
    std::fs::copy(fixtures_dir().join("dtypes.safetensors"), dir.join("model.safetensors")).unwrap();
    let w = Weights::from_component_dir(&dir, "fp16").unwrap();
    assert!(w.contains("f16") && !w.contains("final_layer_norm.weight"));

    let shards = scratch_dir("shards");
    for (i, key) in ["a", "b"].iter().enumerate() {
        let mut tensors = HashMap::new();
        tensors.insert(key.to_string(), safetensors::tensor::TensorView::new(Dtype::F32, vec![1], &[0, 0, 128, 63]).unwrap());
        let bytes = safetensors::serialize(tensors, &None).unwrap();
        std::fs::write(shards.join(format!("diffusion_pytorch_model.fp16-0000{}-of-00002.safetensors", i + 1)), bytes).unwrap();
    }
    let w = Weights::from_component_dir(&shards, "fp16").unwrap();
    assert_eq!(w.names().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(w.vec("b", &[1]).unwrap(), [1.0]);
    std::fs::remove_dir_all(&shards).unwrap();

    let empty = scratch_dir("pickles");
    std::fs::write(empty.join("pytorch_model.bin"), b"not read").unwrap();
    let err = format!("{:#}", Weights::from_component_dir(&empty, "fp16").err().unwrap());
    assert!(err.contains("pickle") && err.contains("sdlora-weights-pickles"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&empty).unwrap();
}

#[test]
fn hugging_face_cache_ids_resolve_offline() {
    let cache = scratch_dir("hfcache");
    let repo = cache.join("models--someorg--tiny-sd");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd\n").unwrap();
    let target = std::fs::canonicalize(tiny_sd()).unwrap();
    std::os::unix::fs::symlink(&target, repo.join("snapshots/0123abcd")).unwrap();
    let snap = resolve_hf_cache("someorg/tiny-sd", &cache).unwrap();
    assert_eq!(snap, repo.join("snapshots/0123abcd"));
    assert_eq!(resolve_hf_cache("someorg/tiny-sd@0123abcd", &cache).unwrap(), snap);
    let w = ModelSource::Diffusers(snap).weights(Component::Vae).unwrap();
    assert!(w.contains("decoder.conv_out.weight"));
    let err = format!("{:#}", resolve_hf_cache("other/model", &cache).unwrap_err());
    assert!(err.contains("models--other--model") && err.contains("not in the Hugging Face cache"), "{err}");
    let err = format!("{:#}", resolve_hf_cache("someorg/tiny-sd@feedbeef", &cache).unwrap_err());
    assert!(err.contains("feedbeef"), "{err}");
    std::fs::remove_dir_all(&cache).unwrap();
}

/// The fixture LoRA, as diffusers' `save_lora_weights` wrote it (PEFT r 4, alpha 8), loads with
/// crate::checkpoint and names exactly the attention projections of the fixture UNet, with their shapes.
#[test]
fn fixture_lora_targets_the_fixture_unet() {
    let lora = crate::checkpoint::load_lora(&fixtures_dir().join("tiny-sd-lora/pytorch_lora_weights.safetensors")).unwrap();
    assert!(lora.skipped.is_empty(), "{:?}", lora.skipped);
    let unet = ModelSource::resolve(tiny_sd().to_str().unwrap()).unwrap().weights(Component::Unet).unwrap();
    let targets: Vec<&str> = unet
        .names()
        .filter(|n| [".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"].iter().any(|s| n.ends_with(s)))
        .collect();
    assert_eq!(lora.weights.layers.len(), targets.len());
    for name in targets {
        let module = name.strip_suffix(".weight").unwrap();
        let layer = lora.weights.layers.get(module).unwrap_or_else(|| panic!("no LoRA for {module}"));
        assert_eq!(unet.shape(name).unwrap(), &[layer.out_features, layer.in_features], "{module}");
        assert_eq!((layer.rank, layer.scale()), (4, 2.0), "{module}");
        assert!(layer.b.iter().any(|&v| v != 0.0), "{module}: B is zero");
    }
}
