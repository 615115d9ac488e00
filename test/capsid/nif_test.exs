defmodule Capsid.NIFTest do
  use ExUnit.Case, async: true
  import Capsid.AdoptionHelpers, only: [tmp_dir!: 1]
  import ExUnit.CaptureLog

  doctest Capsid.NIF

  test "the library in priv matches the checksum recorded beside it" do
    assert :ok = Capsid.NIF.verify(Capsid.NIF.library())
    assert {:ok, path} = Capsid.NIF.load_path()
    assert List.to_string(path) == Path.rootname(Capsid.NIF.library(), ".so")
  end

  test "a library that no longer matches its checksum is refused, with both sums" do
    dir = tmp_dir!("nif")
    library = Path.join(dir, "libcapsid_nif.so")
    File.write!(library, "the original bytes")
    File.write!(Capsid.NIF.record_path(library), Capsid.NIF.checksum("the original bytes") <> "\n")
    assert :ok = Capsid.NIF.verify(library)

    File.write!(library, "tampered bytes")
    assert {:error, message} = Capsid.NIF.verify(library)
    assert message =~ "does not match the checksum recorded"
    assert message =~ "CRC-32 #{Capsid.NIF.checksum("the original bytes")} expected"
    assert message =~ "#{Capsid.NIF.checksum("tampered bytes")} found"

    log =
      capture_log(fn ->
        assert {:error, {:checksum, ^message}} = Capsid.NIF.load_path(library)
      end)

    assert log =~ "Capsid NIF not loaded"
  end

  test "a library without a recorded checksum is refused" do
    dir = tmp_dir!("nif")
    library = Path.join(dir, "libcapsid_nif.so")
    File.write!(library, "bytes")
    assert {:error, message} = Capsid.NIF.verify(library)
    assert message =~ "cannot read its recorded checksum"
  end

  test "target triples are derived as rustler_precompiled derives them" do
    assert Capsid.NIF.target("x86_64-pc-linux-gnu") == "x86_64-unknown-linux-gnu"
    assert Capsid.NIF.target("aarch64-unknown-linux-gnu") == "aarch64-unknown-linux-gnu"
    assert Capsid.NIF.target("x86_64-alpine-linux-musl") == "x86_64-alpine-linux-musl"
    assert Capsid.NIF.target("aarch64-apple-darwin23.4.0") == "aarch64-apple-darwin"
    assert Capsid.NIF.target("arm-apple-darwin20.1.0") == "aarch64-apple-darwin"
    assert Capsid.NIF.target() =~ ~r/^[a-z0-9_]+-[a-z]+-[a-z]+/
  end

  test "the NIF version is the one rustler is built for" do
    cargo = File.read!(Path.expand("../../Cargo.toml", __DIR__))
    [_, major, minor] = Regex.run(~r/"nif_version_(\d+)_(\d+)"/, cargo)
    assert Capsid.NIF.nif_version() == "#{major}.#{minor}"
  end
end
