pub mod seed {
    pub mod yaml;
}
