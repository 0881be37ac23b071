//! A panic as a failure with its reason: the VM runner runs each scenario
//! through [`failing_on_panic`], so a scenario may fail by panicking (an
//! `assert!`, an `expect`) and its result line still says why and where,
//! and the next scenario runs.

use std::cell::RefCell;

thread_local! {
    /// The place and message of the last panic on this thread. Per thread
    /// because a panic is caught on the thread that panicked, and a
    /// scenario's worker threads panic on their own.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Makes every later panic leave its place and message for
/// [`failing_on_panic`], then report itself as before (on stderr).
pub fn record_panics() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        LAST_PANIC.with(|last| *last.borrow_mut() = Some(info.to_string()));
        report(info);
    }));
}

/// Runs `body`; a panic in it becomes `Err` with the panic's place and
/// message (recorded since [`record_panics`]; "panicked" without it).
pub fn failing_on_panic<T, E: From<String>>(
    body: impl FnOnce() -> Result<T, E> + std::panic::UnwindSafe,
) -> Result<T, E> {
    LAST_PANIC.with(|last| last.borrow_mut().take());
    std::panic::catch_unwind(body).unwrap_or_else(|_| {
        Err(LAST_PANIC
            .with(|last| last.borrow_mut().take())
            .unwrap_or_else(|| "panicked".into())
            .into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_fails_with_its_place_and_message() {
        record_panics();
        let failed =
            failing_on_panic::<(), String>(|| panic!("the wire showed the marker")).unwrap_err();
        assert!(
            failed.contains("the wire showed the marker") && failed.contains("panics.rs"),
            "{failed}"
        );
        assert_eq!(failing_on_panic(|| Ok::<_, String>(7)), Ok(7));
        assert_eq!(
            failing_on_panic::<(), String>(|| Err("no record decrypts".into())),
            Err("no record decrypts".into())
        );
    }
}
