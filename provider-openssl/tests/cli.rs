//! The provider binary refuses bad configuration: exit code 2 and a
//! message naming the file and what is wrong (one test body for every
//! handshake provider, in the SDK).

#[test]
fn bad_configuration_exits_2() {
    tlshub_provider_sdk::handshake::library_tests::bad_configuration_exits_2(env!(
        "CARGO_BIN_EXE_tlshub-provider-openssl"
    ));
}
