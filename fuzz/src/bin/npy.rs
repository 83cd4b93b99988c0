//! AFL++ target: [`pacha_fuzz::npy`].
fn main() {
    afl::fuzz!(|data: &[u8]| pacha_fuzz::npy(data));
}
