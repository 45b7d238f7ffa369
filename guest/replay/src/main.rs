//! reapvm's replay guest (see docs/replay.md): after a short kernel-mode entry (entry.rs) it
//! runs entirely in user mode, where kvm-pvm hosts run guest code natively: it replays a
//! function's recorded page accesses (the trace, its initrd) when the VMM says go.

#![no_std]
#![no_main]

mod boot;
mod control;
mod entry;
mod replay;

/// The first user-mode code; `zero_page` is the boot parameters' address.
pub extern "C" fn user_main(zero_page: u64) -> ! {
    let info = boot::read_boot_info(zero_page);
    replay::run(&info)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    control::console(b"panic\n");
    loop {
        core::hint::spin_loop();
    }
}
