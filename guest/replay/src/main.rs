//! reapvm's replay guest (see docs/replay.md): after a short kernel-mode entry (entry.rs) it
//! runs entirely in user mode, where kvm-pvm hosts run guest code natively: it replays a
//! function's recorded page accesses (the trace, its initrd) when the VMM says go.

#![no_std]
#![no_main]

mod boot;
mod control;
mod entropy_check;
mod entry;
mod hostile;
mod replay;
mod virtio;
mod virtio_check;

/// The first user-mode code; `zero_page` is the boot parameters' address.
pub extern "C" fn user_main(zero_page: u64) -> ! {
    let info = boot::read_boot_info(zero_page);
    let cmdline = boot::cmdline(zero_page);
    let has = |arg: &[u8]| cmdline.windows(arg.len()).any(|w| w == arg);
    if has(VIRTIO_CHECK) {
        virtio_check::run(&info, cmdline)
    } else if has(ENTROPY_CHECK) {
        entropy_check::run()
    } else if has(HOSTILE) {
        hostile::run(cmdline)
    } else {
        replay::run(&info)
    }
}

/// The boot argument that selects the virtio-blk DMA check instead of a replay.
const VIRTIO_CHECK: &[u8] = b"reapvm-virtio-check";
/// The boot argument that selects the virtio-rng check.
const ENTROPY_CHECK: &[u8] = b"reapvm-entropy-check";
/// The boot argument that selects a hostile-driver case (`reapvm-hostile=CASE`).
const HOSTILE: &[u8] = b"reapvm-hostile=";

/// The prebuilt libcore is compiled for unwinding and some of its functions name the
/// personality routine; this guest aborts on panic and never unwinds, so it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    control::console(b"panic\n");
    loop {
        core::hint::spin_loop();
    }
}
