//! The packed (quantised-base) projection against the dense projection over the same
//! dequantised values, composed from Burn ops: values and the gradients of x, A and B, with
//! and without a low-rank delta; and NF4 against bitsandbytes' code books applied in numpy
//! (fixtures/reference/quant/nf4.json, xtask/scripts/nf4_reference.py).

use std::path::Path;

use align_kernels::burn::backend::{Autodiff, Flex, NdArray};
use align_kernels::burn::tensor::backend::AutodiffBackend;
use align_kernels::burn::tensor::{Distribution, Tensor, TensorData};
use align_kernels::quant::{GgmlBlock, NF4_CODE, Nf4Scales, dynamic_map};
use align_kernels::{FusedOps, PackedMatrix, PackedWeight, QuantFormat, packed_linear};
use serde_json::Value;

use crate::common::{close, host};

fn check<B: AutodiffBackend + FusedOps>(format: QuantFormat, n: usize, din: usize, dout: usize, r: usize, rel: f64) {
    let dev = Default::default();
    B::seed(&dev, 11);
    let w0 = Tensor::<B, 2>::random([dout, din], Distribution::Normal(0.0, 0.2), &dev);
    let values: Vec<f32> = w0.into_data().convert::<f32>().to_vec().unwrap();
    let packed = PackedWeight::new(PackedMatrix::quantize(format, dout, din, &values).unwrap());
    // The dense reference holds exactly the values the packed op dequantises.
    let w = Tensor::<B, 2>::from_data(TensorData::new(packed.0.dequantize(), [dout, din]), &dev).transpose();
    let x0 = Tensor::<B, 2>::random([n, din], Distribution::Normal(0.0, 1.0), &dev);
    let a0 = Tensor::<B, 2>::random([din, r], Distribution::Normal(0.0, 0.2), &dev);
    let b0 = Tensor::<B, 2>::random([r, dout], Distribution::Normal(0.0, 0.2), &dev);
    let ry = Tensor::<B, 2>::random([n, dout], Distribution::Normal(0.0, 1.0), &dev);
    let scale = 2.0;

    // Without a delta: dx only.
    let x = x0.clone().require_grad();
    let want = x.clone().matmul(w.clone());
    let g = (want.clone() * ry.clone()).sum().backward();
    let want_dx = host(x.grad(&g).unwrap());
    let x = x0.clone().require_grad();
    let got = packed_linear(x.clone(), &packed, None);
    let g = (got.clone() * ry.clone()).sum().backward();
    close("y (base)", &host(got), &host(want), rel);
    close("dx (base)", &host(x.grad(&g).unwrap()), &want_dx, rel);

    // With a delta: dx, dA, dB.
    let (x, a, b) = (x0.clone().require_grad(), a0.clone().require_grad(), b0.clone().require_grad());
    let want = x.clone().matmul(w.clone()) + x.clone().matmul(a.clone()).matmul(b.clone()) * scale;
    let g = (want.clone() * ry.clone()).sum().backward();
    let wants = [host(x.grad(&g).unwrap()), host(a.grad(&g).unwrap()), host(b.grad(&g).unwrap())];
    let (x, a, b) = (x0.require_grad(), a0.require_grad(), b0.require_grad());
    let got = packed_linear(x.clone(), &packed, Some((a.clone(), b.clone(), scale)));
    let g = (got.clone() * ry).sum().backward();
    close("y", &host(got), &host(want), rel);
    let gots = [host(x.grad(&g).unwrap()), host(a.grad(&g).unwrap()), host(b.grad(&g).unwrap())];
    for ((name, got), want) in ["dx", "dA", "dB"].iter().zip(&gots).zip(&wants) {
        close(name, got, want, rel);
    }
}

const FORMATS: [QuantFormat; 4] = [
    QuantFormat::Nf4 { double_quant: false },
    QuantFormat::Nf4 { double_quant: true },
    QuantFormat::Ggml(GgmlBlock::Q8_0),
    QuantFormat::Ggml(GgmlBlock::Q4_0),
];

#[test]
fn matches_the_dense_composition() {
    for format in FORMATS {
        check::<Autodiff<NdArray<f64>>>(format, 13, 64, 96, 4, 1e-10);
        check::<Autodiff<Flex>>(format, 48, 128, 160, 8, 1e-5);
    }
}

align_kernels::gpu_tests!(matches_the_dense_composition_on_gpu, |G| {
    for format in FORMATS {
        check::<Autodiff<G>>(format, 48, 128, 160, 8, crate::common::GPU_REL);
    }
});

/// The generator `xtask/scripts/nf4_reference.py` uses (SplitMix64; Irwin–Hall sums in f32).
fn inputs(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|i| {
            let mut s = 0f32;
            for _ in 0..4 {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                s += (z >> 40) as f32 / (1u64 << 24) as f32;
            }
            let v = (s - 2.0) * 0.05;
            if i % 97 == 0 { v * 8.0 } else { v }
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn nf4_matches_bitsandbytes_code_books_in_numpy() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference/quant/nf4.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let code = floats(&reference["nf4_code"]);
    assert!(code.iter().zip(NF4_CODE).all(|(a, b)| *a == b as f64), "NF4 table {code:?}");
    let map = floats(&reference["dynamic_map"]);
    for (i, (a, b)) in map.iter().zip(dynamic_map()).enumerate() {
        assert_eq!(*a, *b as f64, "dynamic map value {i}");
    }
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let shape: Vec<usize> =
            case["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let double_quant = case["double_quant"].as_bool().unwrap();
        let values = inputs(case["seed"].as_u64().unwrap(), shape[0] * shape[1]);
        let p = PackedMatrix::quantize(QuantFormat::Nf4 { double_quant }, shape[0], shape[1], &values).unwrap();
        let (codes, scales) = p.nf4_parts().unwrap();
        let want_codes: Vec<u8> =
            case["codes"].as_str().unwrap().chars().map(|c| c.to_digit(16).unwrap() as u8).collect();
        assert_eq!(codes, want_codes, "{shape:?} codes");
        if let Nf4Scales::Double { codes, scales, offset } = scales {
            let want: Vec<u8> = (0..case["scale_codes"].as_str().unwrap().len() / 2)
                .map(|i| u8::from_str_radix(&case["scale_codes"].as_str().unwrap()[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            assert_eq!(*codes, want, "{shape:?} scale codes");
            close("scales", &scales.iter().map(|&s| s as f64).collect::<Vec<_>>(), &floats(&case["scales"]), 1e-7);
            assert!((*offset as f64 - case["offset"].as_f64().unwrap()).abs() <= 1e-7, "offset {offset}");
        }
        // The round trip: every dequantised value within 1e-6 of the reference's.
        let got = p.dequantize();
        let want = floats(&case["dequantized"]);
        let worst = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0f64, f64::max);
        assert!(worst <= 1e-6, "{shape:?} double_quant={double_quant}: worst |difference| {worst}");
        assert_eq!(p.stored_bytes(), values.len().div_ceil(2) + scales_bytes(&shape, double_quant));
    }
}

fn scales_bytes(shape: &[usize], double_quant: bool) -> usize {
    let blocks = (shape[0] * shape[1]).div_ceil(64);
    if double_quant { blocks + 4 * blocks.div_ceil(256) + 4 } else { 4 * blocks }
}
