//! AFL++ target: [`pacha_fuzz::fvecs`].
fn main() {
    afl::fuzz!(|data: &[u8]| pacha_fuzz::fvecs(data));
}
