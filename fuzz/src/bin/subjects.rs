//! AFL++ target: [`pacha_fuzz::subjects`].
fn main() {
    afl::fuzz!(|data: &[u8]| pacha_fuzz::subjects(data));
}
