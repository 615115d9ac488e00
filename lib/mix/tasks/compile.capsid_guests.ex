defmodule Mix.Tasks.Compile.CapsidGuests do
  @shortdoc "Builds the Rust guest components under guest/ into priv/guests/"
  @moduledoc """
  Builds every Rust crate under the project's `guest/` directory
  (`guest/NAME/Cargo.toml`) for `wasm32-wasip2` in release mode, and puts
  the component in `priv/guests/NAME.wasm`. Add the compiler to your
  project:

      def project do
        [compilers: [:capsid_guests] ++ Mix.compilers(), ...]
      end

  and load a guest with
  `Capsid.Component.load(Application.app_dir(:my_app, "priv/guests/NAME.wasm"))`.
  `mix capsid.new.guest NAME` scaffolds such a crate and its WIT.

  It is incremental: cargo runs only when a file under `guest/` or `wit/`
  (or the project's `Cargo.toml`, `Cargo.lock`, `.cargo/`) changed since the
  last successful build, and a component in `priv/guests/` is rewritten only
  when its bytes changed. `mix compile --force` runs cargo anyway. A guest
  whose crate was removed has its component removed.

  cargo runs in each crate's directory, so its own configuration applies
  (`CARGO_TARGET_DIR`, `CARGO_BUILD_TARGET_DIR`, `.cargo/config.toml`,
  `rust-toolchain.toml`), and the component is taken from the path cargo
  reports. It needs Rust and its `wasm32-wasip2` target
  (`rustup target add wasm32-wasip2`), except on a machine without cargo
  where every guest's component is already in `priv/guests/`: those are
  used as they are.
  """
  use Mix.Task.Compiler

  @manifest "compile.capsid_guests"
  @manifest_vsn 1
  @target "wasm32-wasip2"

  @impl true
  def manifests, do: [manifest()]

  defp manifest, do: Path.join(Mix.Project.manifest_path(), @manifest)

  @impl true
  def clean do
    {_stamp, names} = read_manifest()
    Enum.each(names, &File.rm(output(File.cwd!(), &1)))
    File.rm(manifest())
  end

  @impl true
  def run(args) do
    {opts, _, _} = OptionParser.parse(args, switches: [force: :boolean])
    root = File.cwd!()
    guests = guests(root)
    names = Enum.map(guests, &Path.basename/1)
    stamp = stamp(root)
    {old_stamp, old_names} = read_manifest()

    for name <- old_names -- names, do: File.rm(output(root, name))

    up_to_date? =
      stamp == old_stamp and names == old_names and
        Enum.all?(names, &File.exists?(output(root, &1)))

    cond do
      guests == [] ->
        write_manifest(stamp, [])
        {:noop, []}

      up_to_date? and not Keyword.get(opts, :force, false) ->
        {:noop, []}

      true ->
        build_all(root, guests, names)
    end
  end

  defp build_all(root, guests, names) do
    if System.find_executable("cargo") == nil and
         Enum.all?(names, &File.exists?(output(root, &1))) do
      # A machine without Rust (a release build with prebuilt components).
      Mix.shell().info("cargo not found: using the components already in priv/guests/")
      {:noop, []}
    else
      check_toolchain!(root, hd(guests))
      build_each(root, guests, names)
    end
  end

  defp build_each(root, guests, names) do
    diagnostics = Enum.flat_map(guests, &build(root, &1))

    if diagnostics == [] do
      # Stamped after the build, which may have written a Cargo.lock.
      write_manifest(stamp(root), names)
      {:ok, []}
    else
      {:error, diagnostics}
    end
  end

  @doc false
  # The crate directories `guest/*` that hold a Cargo.toml.
  def guests(root) do
    Path.wildcard(Path.join([root, "guest", "*", "Cargo.toml"]))
    |> Enum.map(&Path.dirname/1)
    |> Enum.sort()
  end

  defp output(root, name), do: Path.join([root, "priv", "guests", "#{name}.wasm"])

  defp build(root, dir) do
    name = Path.basename(dir)
    Mix.shell().info("Building guest #{name} (cargo build --release --target #{@target})")
    args = ["build", "--release", "--target", @target, "--message-format=json-render-diagnostics"]

    # cargo's progress and errors go to the terminal (stderr); its JSON
    # messages, with the paths of the files it wrote, come on stdout.
    case System.cmd("cargo", args, cd: dir) do
      {out, 0} ->
        case component(out) do
          nil ->
            error(
              dir,
              "cargo built no cdylib for guest/#{name}: its Cargo.toml needs " <>
                ~s([lib] crate-type = ["cdylib"])
            )

          wasm ->
            install(File.read!(wasm), output(root, name))
            []
        end

      {_, status} ->
        error(
          dir,
          "cargo build failed for guest/#{name} (exit status #{status}); see its output above"
        )
    end
  end

  defp error(dir, message) do
    Mix.shell().error(message)

    [
      %Mix.Task.Compiler.Diagnostic{
        compiler_name: "capsid_guests",
        file: Path.join(dir, "Cargo.toml"),
        message: message,
        position: nil,
        severity: :error
      }
    ]
  end

  # The .wasm file of the crate's cdylib among cargo's compiler-artifact
  # messages (a crate's dependencies are rlibs; a binary target would be a
  # .wasm of kind "bin").
  defp component(out) do
    out
    |> String.split("\n")
    |> Enum.find_value(fn line ->
      if String.contains?(line, ~s("reason":"compiler-artifact")) and
           line =~ ~r/"crate_types":\[[^\]]*"cdylib"/ do
        case Regex.run(~r/"filenames":\[[^\]]*?"((?:[^"\\]|\\.)*\.wasm)"/, line) do
          [_, path] -> String.replace(path, ~r/\\(.)/, "\\1")
          nil -> nil
        end
      end
    end)
  end

  defp install(wasm, path) do
    File.mkdir_p!(Path.dirname(path))
    # Rewritten only when it changed, so that whatever watches the file
    # (`Capsid.deploy(..., watch: true)`, an `@external_resource`) sees only
    # real changes.
    unless File.read(path) == {:ok, wasm} do
      File.write!(path <> ".tmp", wasm)
      File.rename!(path <> ".tmp", path)
    end
  end

  @doc false
  # Raises with what to install when cargo or the wasm32-wasip2 target is
  # missing (for the toolchain that cargo will use in `dir`).
  def check_toolchain!(root, dir) do
    unless System.find_executable("cargo") do
      Mix.raise("cargo not found: building the guests under guest/ needs Rust (https://rustup.rs)")
    end

    rustc = System.get_env("RUSTC") || "rustc"

    case System.cmd(rustc, ["--print", "target-libdir", "--target", @target],
           cd: dir,
           stderr_to_stdout: true
         ) do
      {libdir, 0} ->
        libdir = String.trim(libdir)

        unless File.dir?(libdir) do
          Mix.raise("""
          Rust's #{@target} target is not installed, and the guests under \
          #{Path.relative_to(Path.join(root, "guest"), root)}/ are built for it. Add it with:

              rustup target add #{@target}
          """)
        end

      {output, _} ->
        Mix.raise("#{rustc} --print target-libdir --target #{@target} failed:\n#{output}")
    end
  end

  @doc false
  # A digest of the size and mtime of every file that can change a guest:
  # guest/ (without cargo's target directories), wit/, and the project's
  # cargo files.
  def stamp(root) do
    files =
      files(Path.join(root, "guest")) ++
        files(Path.join(root, "wit")) ++
        files(Path.join(root, ".cargo")) ++
        Enum.filter(
          [Path.join(root, "Cargo.toml"), Path.join(root, "Cargo.lock")],
          &File.regular?/1
        )

    files
    |> Enum.sort()
    |> Enum.map(fn file ->
      %File.Stat{size: size, mtime: mtime} = File.stat!(file, time: :posix)
      {file, size, mtime}
    end)
    |> :erlang.term_to_binary()
    |> then(&:crypto.hash(:sha256, &1))
  end

  # Every regular file under `dir`, skipping cargo target directories (they
  # hold a CACHEDIR.TAG).
  defp files(dir) do
    case File.ls(dir) do
      {:ok, entries} ->
        if "CACHEDIR.TAG" in entries do
          []
        else
          Enum.flat_map(entries, fn entry ->
            path = Path.join(dir, entry)

            cond do
              File.dir?(path) -> files(path)
              File.regular?(path) -> [path]
              true -> []
            end
          end)
        end

      {:error, _} ->
        []
    end
  end

  defp read_manifest do
    with {:ok, binary} <- File.read(manifest()),
         {@manifest_vsn, stamp, names} <- safe_binary_to_term(binary) do
      {stamp, names}
    else
      _ -> {nil, []}
    end
  end

  defp safe_binary_to_term(binary) do
    :erlang.binary_to_term(binary)
  rescue
    ArgumentError -> nil
  end

  defp write_manifest(stamp, names) do
    File.mkdir_p!(Path.dirname(manifest()))
    File.write!(manifest(), :erlang.term_to_binary({@manifest_vsn, stamp, names}))
  end
end
