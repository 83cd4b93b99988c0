//! AMX-INT8 block products (Intel Advanced Matrix Extensions: `tdpbssd` on 16 × 64-byte tiles), the fastest
//! [`crate::exact_i8::I8Kernel`] where the CPU and the OS allow it.
//!
//! One call multiplies a packed block of 32 probe rows by one packed panel of 32 base rows. The panel is the
//! VNNI kernel's ([`crate::exact_i8::pack_base`] with `nr = 32`, no offset): `[k/4][32 lanes][4 bytes]`, which
//! is exactly the AMX "B" operand layout (each 128-byte group row holds 4 bytes of each lane), read as two
//! 16-lane tiles with a 128-byte stride. The probe block is stored tile by tile
//! ([`crate::exact_i8::probe_offset`]: for each 64-byte step of `k`, rows 0..16 then rows 16..32, 1 KB each),
//! so a tile load reads 1 KB in a row (measured ≈ 18 % faster than row-major rows 512 bytes apart). `tdpbssd` multiplies i8 by i8 and sums groups of four
//! into i32 without saturation, so the block's products are the exact integer dot products, the same as
//! every other kernel's (property tests in [`crate::exact_i8`]).
//!
//! Tile registers: `tmm0..tmm3` the 2 × 2 accumulators (16 × 16 i32 each), `tmm4`/`tmm5` two 16-row probe
//! tiles, `tmm6`/`tmm7` two 16-lane panel tiles; each 64-byte step of `k` is 4 loads and 4 `tdpbssd`.
//!
//! **Availability.** The CPU must report AMX-TILE and AMX-INT8 (CPUID leaf 7) and Linux must grant the
//! process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once); without
//! that grant a tile instruction faults. `PACHA_AMX=off` turns the kernel off (the VNNI kernel runs instead),
//! for comparisons on one machine. Each thread loads the tile configuration once, on its first block
//! (`ldtilecfg` costs ≈ 70 ns, a 512-d block ≈ 460 ns); nothing else in the process configures tiles.

use std::sync::OnceLock;

/// True iff this CPU has AMX-INT8, the OS granted the tile state, and `PACHA_AMX` does not turn it off.
pub(crate) fn supported() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let off = std::env::var("PACHA_AMX").is_ok_and(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "off" || v == "0" || v == "no"
        });
        !off && cpu_has_amx_int8() && request_tile_state()
    })
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_amx_int8() -> bool {
    // CPUID.(EAX=7, ECX=0):EDX bit 24 = AMX-TILE, bit 25 = AMX-INT8. The filters that run beside the AMX
    // products use AVX-512F; every CPU with AMX has it, checked all the same.
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    (edx >> 24) & 1 == 1
        && (edx >> 25) & 1 == 1
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_amx_int8() -> bool {
    false
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only asks the kernel to allow a larger signal/xsave frame
    // for this process; it takes two integers, touches no memory of ours, and fails cleanly (−1) where the
    // kernel or the CPU does not support AMX.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}

/// Probe rows per block.
pub(crate) const MR: usize = 32;
/// Base lanes per block (one packed panel).
pub(crate) const NR: usize = 32;
/// Bytes of `k` per tile step: every row's `kp` must be a multiple of it.
pub(crate) const K_STEP: usize = 64;

#[cfg(target_arch = "x86_64")]
thread_local! {
    static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `out[r·32 + l] = a_r · b_l` for the 32 probe rows of `a` (`kp` bytes each, tile by tile) and the 32 lanes
/// of the panel `b` (`[kp/4][32][4]`, no offset).
///
/// # Safety
/// [`supported`] returned true; `a` holds at least `32·kp` bytes, `b` at least `32·kp`, `out` 1 024 values, and
/// `kp` is a positive multiple of [`K_STEP`].
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn block(a: &[i8], kp: usize, b: &[u8], out: &mut [i32]) {
    use std::arch::asm;
    debug_assert!(
        a.len() >= MR * kp
            && b.len() >= NR * kp
            && out.len() >= MR * NR
            && kp.is_multiple_of(K_STEP)
    );
    CONFIGURED.with(|c| {
        if !c.get() {
            // Palette 1; all eight tiles 16 rows × 64 bytes.
            #[repr(C, align(64))]
            struct TileConfig([u8; 64]);
            let mut cfg = TileConfig([0; 64]);
            cfg.0[0] = 1;
            for t in 0..8 {
                cfg.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
                cfg.0[48 + t] = 16;
            }
            // SAFETY: the CPU has AMX and the OS granted the tile state (the caller's contract); the
            // configuration is a valid 64-byte palette-1 block that lives through the instruction.
            unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
            c.set(true);
        }
    });
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    // Probe tiles: 64-byte rows in a row (stride 64), tile (s, h) at (2s + h)·1 KB; panel tiles: stride 128.
    let (sa, sb) = (K_STEP, 4 * NR);
    let tile = 16 * K_STEP;
    // SAFETY: tiles are configured on this thread (above); `tilezero` touches no memory.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        )
    };
    let steps = kp / K_STEP;
    for s in 0..steps {
        // SAFETY: each tile load reads 16 rows of 64 bytes: the probe tiles (s, 0) and (s, 1), 1 KB each at
        // (2s + 1)·1 KB + 1 KB ≤ 32·kp bytes (since 64s + 64 ≤ kp); panel group rows 16s..16s+16, 128 bytes
        // apart, lanes 0..16 (bytes 0..64) and 16..32 (bytes 64..128) of each (within `32·kp` bytes since
        // (16s + 16)·128 ≤ 32·kp).
        unsafe {
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbssd tmm0, tmm4, tmm6",
                "tdpbssd tmm1, tmm4, tmm7",
                "tdpbssd tmm2, tmm5, tmm6",
                "tdpbssd tmm3, tmm5, tmm7",
                a0 = in(reg) ap.add(2 * s * tile),
                a1 = in(reg) ap.add((2 * s + 1) * tile),
                b0 = in(reg) bp.add(s * 16 * sb),
                b1 = in(reg) bp.add(s * 16 * sb + 64),
                sa = in(reg) sa,
                sb = in(reg) sb,
                options(nostack, readonly)
            )
        };
    }
    let o = out.as_mut_ptr();
    let so = 4 * NR;
    // SAFETY: each store writes 16 rows of 16 i32 (64 bytes) 128 bytes apart: the four 16 × 16 quarters of
    // the 32 × 32 row-major block, all within `out`'s 1 024 values.
    unsafe {
        asm!(
            "tilestored [{o0} + {so}*1], tmm0",
            "tilestored [{o1} + {so}*1], tmm1",
            "tilestored [{o2} + {so}*1], tmm2",
            "tilestored [{o3} + {so}*1], tmm3",
            o0 = in(reg) o,
            o1 = in(reg) o.add(16),
            o2 = in(reg) o.add(16 * NR),
            o3 = in(reg) o.add(16 * NR + 16),
            so = in(reg) so,
            options(nostack)
        )
    };
}
