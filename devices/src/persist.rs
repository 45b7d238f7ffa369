//! Saving and restoring a device, each device owning its own state (Firecracker's `Persist`
//! trait): `save` runs while the VM is paused; `restore` builds the device anew from what a
//! state cannot carry (event fds, open files, guest memory: the constructor arguments) and
//! the saved state, which is untrusted input and is checked.

use serde::de::DeserializeOwned;
use serde::Serialize;

pub trait Persist: Sized {
    /// What goes into the vmstate file.
    type State: Serialize + DeserializeOwned;
    /// What the restored device needs besides its state.
    type ConstructorArgs;
    type Error: std::error::Error;

    fn save(&self) -> Self::State;

    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
