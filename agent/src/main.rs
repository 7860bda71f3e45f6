//! `kubeboot`: see the library for everything; this only hands over.

fn main() -> std::process::ExitCode {
    kubeboot::cli::main()
}
