//! Writes every target's seed corpus: `cargo run --example seeds -- <dir>` fills
//! `<dir>/<target>/<seed>` (run.sh writes them to `corpus/` with `run.sh seeds`). The seeds come
//! from the real writers, so regenerating them after a format change keeps them valid.

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: seeds <corpus dir>"));
    for (target, seeds) in tessera_fuzz::all_seeds() {
        let at = dir.join(target);
        std::fs::create_dir_all(&at).expect("the corpus directory");
        for (name, bytes) in seeds {
            std::fs::write(at.join(name), &bytes).expect("a seed file");
            println!("{target}/{name}: {} bytes", bytes.len());
        }
    }
}
