use std::process::ExitCode;

use clap::Parser;
use vhost_user_blk::{capabilities, run, Args, Config};

fn main() -> ExitCode {
    let args = Args::parse();
    if args.listen.print_capabilities {
        println!("{}", capabilities());
        return ExitCode::SUCCESS;
    }
    vhost_user_common::logging::init(args.listen.log_level);
    let result = Config::try_from(args)
        .map_err(|e| e.to_string())
        .and_then(|config| run(config).map_err(|e| e.to_string()));
    vhost_user_common::logging::exit_status("vhost-user-blk", result)
}
