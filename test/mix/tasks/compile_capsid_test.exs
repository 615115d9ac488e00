defmodule Mix.Tasks.Compile.CapsidTest do
  # The `:capsid` compiler is defined in mix.exs; these tests cover its
  # prebuilt-NIF path (the cargo path runs on every `mix compile`).
  use ExUnit.Case, async: false
  import Capsid.AdoptionHelpers
  import ExUnit.CaptureIO

  alias Mix.Tasks.Compile.Capsid, as: Compiler

  @version Mix.Project.config()[:version]
  @name "libcapsid_nif-v#{@version}-nif-2.16-x86_64-unknown-linux-gnu.so"

  defp artifact!(dir, name \\ @name, library \\ "a library's bytes") do
    path = Path.join(dir, name <> ".tar.gz")

    :ok =
      :erl_tar.create(String.to_charlist(path), [{String.to_charlist(name), library}], [:compressed])

    path
  end

  test "a prebuilt NIF with the right SHA-256 is installed with its checksum" do
    dir = tmp_dir!("prebuilt")
    artifact = artifact!(dir)
    native = Path.join(dir, "native")

    Compiler.install_prebuilt(artifact, Capsid.NIF.sha256(File.read!(artifact)), native)

    library = Path.join(native, "libcapsid_nif.so")
    assert File.read!(library) == "a library's bytes"
    assert :ok = Capsid.NIF.verify(library)
  end

  test "a prebuilt NIF with a wrong SHA-256 is a clear error, and nothing is installed" do
    dir = tmp_dir!("prebuilt")
    artifact = artifact!(dir)
    native = Path.join(dir, "native")
    wrong = String.duplicate("ab", 32)

    error =
      assert_raise Mix.Error, fn ->
        Compiler.install_prebuilt(artifact, "sha256:" <> wrong, native)
      end

    assert error.message =~ "does not match its checksum"
    assert error.message =~ "expected SHA-256 #{wrong}"
    assert error.message =~ "actual SHA-256   #{Capsid.NIF.sha256(File.read!(artifact))}"
    refute File.exists?(native)
  end

  test "without a SHA-256, the checksum file beside the artifact is used" do
    dir = tmp_dir!("prebuilt")
    artifact = artifact!(dir)
    native = Path.join(dir, "native")

    assert_raise Mix.Error, ~r/no SHA-256 for the prebuilt Capsid NIF/, fn ->
      Compiler.install_prebuilt(artifact, nil, native)
    end

    checksums = Path.join(dir, Capsid.NIF.checksum_file())

    File.write!(
      checksums,
      ~s(%{"#{Path.basename(artifact)}" => "sha256:#{String.duplicate("0", 64)}"})
    )

    assert_raise Mix.Error, ~r/does not match its checksum/, fn ->
      Compiler.install_prebuilt(artifact, nil, native)
    end

    sum = Capsid.NIF.sha256(File.read!(artifact))
    File.write!(checksums, ~s(%{\n  "#{Path.basename(artifact)}" => "sha256:#{sum}",\n}\n))
    Compiler.install_prebuilt(artifact, nil, native)
    assert File.read!(Path.join(native, "libcapsid_nif.so")) == "a library's bytes"
  end

  test "an artifact for another Capsid version, or not named like one, is refused" do
    dir = tmp_dir!("prebuilt")
    other = artifact!(dir, "libcapsid_nif-v0.0.1-nif-2.16-x86_64-unknown-linux-gnu.so")
    sum = Capsid.NIF.sha256(File.read!(other))

    assert_raise Mix.Error, ~r/is for Capsid 0.0.1, not #{@version}/, fn ->
      Compiler.install_prebuilt(other, sum, dir)
    end

    renamed = Path.join(dir, "nif.tar.gz")
    File.cp!(other, renamed)

    assert_raise Mix.Error, ~r/not a Capsid NIF artifact/, fn ->
      Compiler.install_prebuilt(renamed, sum, dir)
    end
  end

  test "mix capsid.nif.package makes an artifact that installs the same library" do
    dir = tmp_dir!("package")
    out = capture_io(fn -> Mix.Tasks.Capsid.Nif.Package.run(["--output", dir]) end)

    name = Capsid.NIF.artifact_name(@version, Capsid.NIF.target())
    artifact = Path.join(dir, name)
    sum = Capsid.NIF.sha256(File.read!(artifact))
    assert out =~ "SHA-256 #{sum}"
    assert out =~ "CAPSID_PREBUILT_NIF=#{artifact}"

    assert {%{^name => "sha256:" <> ^sum}, _} =
             Code.eval_file(Path.join(dir, Capsid.NIF.checksum_file()))

    native = Path.join(dir, "native")
    Compiler.install_prebuilt(artifact, nil, native)
    assert File.read!(Path.join(native, "libcapsid_nif.so")) == File.read!(Capsid.NIF.library())
  end

  test "the CAPSID_PREBUILT_NIF variables are what the compiler installs from" do
    dir = tmp_dir!("prebuilt")
    artifact = artifact!(dir)
    put_env([{"CAPSID_PREBUILT_NIF", artifact}, {"CAPSID_PREBUILT_NIF_SHA256", "0"}])

    in_project(:capsid_prebuilt_probe, dir, [version: @version], fn ->
      assert_raise Mix.Error, ~r/does not match its checksum/, fn -> Compiler.run([]) end
    end)

    refute File.exists?(Path.join([dir, "priv", "native"]))
  end
end
