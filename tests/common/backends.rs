//! `backend_suite!`: expands generic test bodies once per compiled backend.
//!
//! ```ignore
//! fn softmax_matches_reference<B: kvsieve::Ops>(b: &B) { ... }
//! backend_suite!(softmax_matches_reference);
//! ```
//!
//! expands to `reference::softmax_matches_reference`, and one module per
//! other backend compiled in, each with the same test names, so
//! `cargo test reference::` runs one backend.
//!
//! GPU backends that find no device print `SKIPPED(<backend>): <reason>`;
//! with `KVSIEVE_REQUIRE=<backend>[,<backend>]` a skip is a failure.

/// True when the environment demands that `backend` runs.
pub fn required(backend: &str) -> bool {
    std::env::var("KVSIEVE_REQUIRE")
        .map(|v| v.split(',').any(|b| b.trim() == backend))
        .unwrap_or(false)
}

/// Reports a skip loudly, or panics when the backend is required.
pub fn skip(backend: &str, reason: &str) {
    assert!(
        !required(backend),
        "KVSIEVE_REQUIRE={backend} but the backend is unavailable: {reason}"
    );
    eprintln!("SKIPPED({backend}): {reason}");
}

#[macro_export]
macro_rules! backend_suite {
    ($($body:ident),* $(,)?) => {
        mod reference {
            $(
                #[test]
                fn $body() {
                    super::$body(&kvsieve::reference::Reference);
                }
            )*
        }
    };
}
