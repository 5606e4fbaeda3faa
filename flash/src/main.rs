//! `flash`: the command line (`cli/`); exit codes: 1 a failed write,
//! 2 a refused target, 3 a failed verify.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
