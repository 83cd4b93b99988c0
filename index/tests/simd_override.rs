//! The kernel override (own process: it changes global state).

use pacha_index::kernels::{self, SimdMode, scalar, set_simd_override, simd_level};

#[test]
fn override_forces_scalar_and_back() {
    let a: Vec<f32> = (0..515)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let b: Vec<f32> = (0..515)
        .map(|i| ((i * 53) % 97) as f32 / 48.0 - 1.0)
        .collect();
    let h: Vec<half::f16> = a.iter().map(|&x| half::f16::from_f32(x)).collect();

    set_simd_override(Some(SimdMode::Scalar));
    assert_eq!(simd_level(), "scalar");
    assert!(!kernels::simd_enabled());
    assert_eq!(
        kernels::dot_f32(&a, &b).to_bits(),
        scalar::dot_f32(&a, &b).to_bits()
    );
    assert_eq!(
        kernels::dot_f16(&h, &h).to_bits(),
        scalar::dot_f16(&h, &h).to_bits()
    );

    set_simd_override(Some(SimdMode::Simd));
    assert!(kernels::simd_enabled());
    assert_eq!(simd_level(), kernels::simsimd_backend());
    assert_ne!(simd_level(), "scalar");
    assert_eq!(
        kernels::dot_f32(&a, &b).to_bits(),
        kernels::simd::dot_f32(&a, &b).to_bits()
    );

    set_simd_override(None);
    // Without PACHA_SIMD=scalar in the environment the default is simsimd.
    let expect_scalar = std::env::var("PACHA_SIMD").is_ok_and(|v| v.eq_ignore_ascii_case("scalar"));
    assert_eq!(simd_level() == "scalar", expect_scalar);
}
