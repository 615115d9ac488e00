defmodule Mix.Tasks.Compile.Capsid do
  @shortdoc "Builds the Capsid NIF (or installs a prebuilt one)"
  @moduledoc """
  Puts the NIF in `priv/native/libcapsid_nif.so`, with its checksum beside it
  in `libcapsid_nif.so.crc32` (`Capsid.Native` checks it before every load;
  see `Capsid.NIF`):

    * from a prebuilt artifact when one is configured (the
      `CAPSID_PREBUILT_NIF` environment variable, or `config :capsid,
      prebuilt_nif: [path: ..., sha256: ...]` in the application's config):
      its SHA-256 is checked first, and cargo does not run;
    * otherwise with `cargo build --release -p capsid_nif`, taking the library
      from the path cargo reports, so `CARGO_TARGET_DIR`,
      `CARGO_BUILD_TARGET_DIR` and `.cargo/config.toml` are all honoured.

  When Capsid itself is the project being compiled (its own dev and test,
  never as a dependency), it also builds Capsid's own guests (`guest/*`: the
  demo's example, the test fixtures, the benchmark kernels) for
  `wasm32-wasip2` into `priv/guests/`. A dependent application builds only
  the NIF, and needs no wasm target for it.

  This compiler lives in `mix.exs` because it must run before `lib/` is
  compiled; `Mix.Tasks.Compile.CapsidGuests` builds an application's guests.
  """
  use Mix.Task.Compiler

  @lib "libcapsid_nif"
  @checksum_file "checksum-Elixir.Capsid.Native.exs"

  @impl true
  def run(_args) do
    root = File.cwd!()
    native = Path.join([root, "priv", "native"])

    case prebuilt() do
      nil -> build_nif(root, native)
      {artifact, sha256} -> install_prebuilt(artifact, sha256, native)
    end

    if dependency?(), do: {:ok, []}, else: build_own_guests(root)
  end

  # Mix compiles a dependency with its parent's deps directory, and with the
  # application path it chose for it (`:app_path` up to Elixir 1.14,
  # `:deps_app_path` later); Capsid's own project has neither.
  defp dependency? do
    config = Mix.Project.config()

    config[:app_path] != nil or config[:deps_app_path] != nil or
      Mix.Project.deps_path() != Path.expand(System.get_env("MIX_DEPS_PATH") || "deps")
  end

  ## The NIF from source

  defp build_nif(root, native) do
    unless File.exists?(Path.join(native, "#{@lib}.so")) do
      Mix.shell().info("""
      Building the Capsid NIF (Rust: wasmtime and Cranelift) with `cargo build --release`.
      The first build compiles about 170 crates and takes several minutes (about 7 on two
      cores); later builds take seconds. To skip it, use a prebuilt NIF
      (CAPSID_PREBUILT_NIF, see Capsid's guide "Using Capsid in your application").\
      """)
    end

    out = cargo!(["build", "--release", "-p", "capsid_nif"], root)
    lib = artifact!(out, ["#{@lib}.so", "#{@lib}.dylib"])
    install(File.read!(lib), native)
  end

  ## A prebuilt NIF

  # `{artifact, expected_sha256 | nil}` when a prebuilt NIF is configured.
  defp prebuilt do
    config =
      case Application.get_env(:capsid, :prebuilt_nif, []) do
        path when is_binary(path) -> [path: path]
        config -> config
      end

    case System.get_env("CAPSID_PREBUILT_NIF") || config[:path] do
      nil -> nil
      "" -> nil
      path -> {Path.expand(path), System.get_env("CAPSID_PREBUILT_NIF_SHA256") || config[:sha256]}
    end
  end

  @doc false
  # Checks `artifact` (a `.tar.gz` made by `mix capsid.nif.package`, named as
  # rustler_precompiled names its artifacts) against `expected` (hex, or
  # "sha256:hex"; when nil, the artifact's entry in the checksum file beside
  # it), then installs the library it holds into `native`. Raises on any
  # mismatch, before anything is installed.
  def install_prebuilt(artifact, expected, native) do
    name = Path.basename(artifact)
    version = Mix.Project.config()[:version]

    case Regex.run(~r/^#{@lib}-v(.+)-nif-(\d+\.\d+)-(.+)\.(so|dll)\.tar\.gz$/, name) do
      [_, ^version | _] ->
        :ok

      [_, other | _] ->
        Mix.raise("the prebuilt Capsid NIF #{artifact} is for Capsid #{other}, not #{version}")

      nil ->
        Mix.raise(
          "#{artifact} is not a Capsid NIF artifact (expected a name like " <>
            "#{@lib}-v#{version}-nif-2.16-x86_64-unknown-linux-gnu.so.tar.gz, " <>
            "as `mix capsid.nif.package` makes)"
        )
    end

    bytes =
      case File.read(artifact) do
        {:ok, bytes} ->
          bytes

        {:error, reason} ->
          Mix.raise(
            "cannot read the prebuilt Capsid NIF #{artifact}: #{:file.format_error(reason)}"
          )
      end

    expected = normalize_sha256(expected || checksum_entry(artifact))
    actual = sha256(bytes)

    cond do
      expected == nil ->
        Mix.raise(
          "no SHA-256 for the prebuilt Capsid NIF #{artifact}: set CAPSID_PREBUILT_NIF_SHA256 " <>
            "(or config :capsid, prebuilt_nif: [sha256: ...]), or keep the #{@checksum_file} " <>
            "written by `mix capsid.nif.package` beside it"
        )

      expected != actual ->
        Mix.raise("""
        the prebuilt Capsid NIF #{artifact} does not match its checksum:
            expected SHA-256 #{expected}
            actual SHA-256   #{actual}
        Nothing was installed. Use the artifact this checksum was recorded for, or rebuild it
        with `mix capsid.nif.package`.\
        """)

      true ->
        install(library_in(artifact, bytes), native)
    end
  end

  defp library_in(artifact, bytes) do
    with {:ok, files} <- :erl_tar.extract({:binary, bytes}, [:compressed, :memory]),
         {_, library} <-
           Enum.find(files, fn {file, _} -> Path.extname(to_string(file)) in [".so", ".dll"] end) do
      library
    else
      _ -> Mix.raise("the prebuilt Capsid NIF #{artifact} holds no .so library")
    end
  end

  # The artifact's entry in the checksum file beside it (rustler_precompiled's
  # format: a map of artifact name => "sha256:hex"), read without evaluating it.
  defp checksum_entry(artifact) do
    file = Path.join(Path.dirname(artifact), @checksum_file)

    with {:ok, text} <- File.read(file),
         {:ok, {:%{}, _, pairs}} <- Code.string_to_quoted(text),
         {_, sum} when is_binary(sum) <- List.keyfind(pairs, Path.basename(artifact), 0) do
      sum
    else
      _ -> nil
    end
  end

  defp normalize_sha256(nil), do: nil
  defp normalize_sha256("sha256:" <> hex), do: normalize_sha256(hex)
  defp normalize_sha256(hex), do: hex |> String.trim() |> String.downcase()

  defp sha256(bytes), do: :crypto.hash(:sha256, bytes) |> Base.encode16(case: :lower)

  # Writes the library and its checksum, replacing the file by a rename (a
  # running VM keeps its mapping of the old one), and only when it changed.
  defp install(library, native) do
    File.mkdir_p!(native)
    path = Path.join(native, "#{@lib}.so")

    unless File.read(path) == {:ok, library} do
      File.write!(path <> ".tmp", library)
      File.rename!(path <> ".tmp", path)
    end

    # The record Capsid.NIF.verify/1 checks before every load.
    record = Base.encode16(<<:erlang.crc32(library)::32>>, case: :lower) <> "\n"
    unless File.read(path <> ".crc32") == {:ok, record}, do: File.write!(path <> ".crc32", record)
  end

  ## Capsid's own guests (only when Capsid is the project being compiled)

  defp build_own_guests(root) do
    crates =
      Path.wildcard(Path.join([root, "guest", "*", "Cargo.toml"]))
      |> Enum.map(&(&1 |> Path.dirname() |> Path.basename()))
      |> Enum.sort()

    args = ["build", "--release", "--target", "wasm32-wasip2"] ++ Enum.flat_map(crates, &["-p", &1])
    out = cargo!(args, root)

    for crate <- crates do
      wasm = File.read!(artifact!(out, ["#{crate}.wasm"]))
      path = Path.join([root, "priv", "guests", "#{crate}.wasm"])
      File.mkdir_p!(Path.dirname(path))
      # Rewritten only when it changed: whatever watches it sees real changes.
      unless File.read(path) == {:ok, wasm}, do: File.write!(path, wasm)
    end

    {:ok, []}
  end

  ## cargo

  # Runs cargo with JSON messages on stdout (its progress and errors go to
  # the terminal through stderr) and returns them.
  defp cargo!(args, root) do
    unless System.find_executable("cargo") do
      Mix.raise(
        "cargo not found: Capsid builds its NIF from Rust source. Install Rust " <>
          "(https://rustup.rs), or use a prebuilt NIF (CAPSID_PREBUILT_NIF)"
      )
    end

    case System.cmd("cargo", args ++ ["--message-format=json-render-diagnostics"], cd: root) do
      {out, 0} -> out
      {_, status} -> Mix.raise("cargo #{Enum.join(args, " ")} failed (exit status #{status})")
    end
  end

  # The path of the file with one of `names` that cargo reports it built
  # (a `filenames` entry of a compiler-artifact message).
  defp artifact!(out, names) do
    alternatives = Enum.map_join(names, "|", &Regex.escape/1)

    case Regex.run(~r{"([^"]*/(?:#{alternatives}))"}, out, capture: :all_but_first) do
      [path] -> path
      nil -> Mix.raise("cargo reported no #{Enum.join(names, " or ")} among the files it built")
    end
  end
end

defmodule Capsid.MixProject do
  use Mix.Project

  def project do
    [
      app: :capsid,
      version: "0.1.0",
      elixir: "~> 1.14",
      compilers: [:capsid] ++ Mix.compilers(),
      start_permanent: Mix.env() == :prod,
      elixirc_paths: elixirc_paths(Mix.env()),
      deps: [],
      docs: [main: "Capsid"]
    ]
  end

  def application do
    [extra_applications: [:logger, :crypto, :inets], mod: {Capsid.Application, []}]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end
