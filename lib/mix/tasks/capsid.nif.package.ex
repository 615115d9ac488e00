defmodule Mix.Tasks.Capsid.Nif.Package do
  @shortdoc "Packages the compiled Capsid NIF as a prebuilt artifact, with its SHA-256"
  @moduledoc """
  Packages the Capsid NIF that `mix compile` built (or installed), so that
  other builds of the same target can use it instead of running cargo:

      mix capsid.nif.package [--output DIR] [--target TRIPLE]

  writes, in `DIR` (default: the current directory),

    * `libcapsid_nif-vVERSION-nif-NIF_VERSION-TARGET.so.tar.gz`, holding the
      library (for example
      `libcapsid_nif-v0.1.0-nif-2.16-x86_64-unknown-linux-gnu.so.tar.gz`);
    * `checksum-Elixir.Capsid.Native.exs`: `%{"artifact name" => "sha256:HEX"}`,
      merged with the entries already there (one file for all targets);

  and prints the artifact's SHA-256 and how to use it. Names and the checksum
  file follow rustler_precompiled's conventions. `TARGET` defaults to this
  machine's Rust target triple.

  Another build then skips cargo with

      CAPSID_PREBUILT_NIF=DIR/libcapsid_nif-....so.tar.gz \\
      CAPSID_PREBUILT_NIF_SHA256=HEX mix deps.compile capsid --force

  or with `config :capsid, prebuilt_nif: [path: ..., sha256: ...]` in
  `config/config.exs`. Without a SHA-256, the artifact's entry in the
  checksum file beside it is used. The SHA-256 is checked before anything
  is installed; a mismatch stops the build.
  """
  use Mix.Task

  @impl true
  def run(args) do
    {opts, _, _} = OptionParser.parse(args, strict: [output: :string, target: :string])
    Mix.Task.run("compile")

    library = Capsid.NIF.library()

    case Capsid.NIF.verify(library) do
      :ok -> :ok
      {:error, message} -> Mix.raise(message)
    end

    Application.load(:capsid)
    version = Application.spec(:capsid, :vsn) |> to_string()
    target = opts[:target] || Capsid.NIF.target()
    out = Path.expand(opts[:output] || ".")
    File.mkdir_p!(out)

    name = Capsid.NIF.artifact_name(version, target)
    artifact = Path.join(out, name)
    member = {String.to_charlist(Capsid.NIF.library_name(version, target)), File.read!(library)}
    :ok = :erl_tar.create(String.to_charlist(artifact), [member], [:compressed])

    sha256 = Capsid.NIF.sha256(File.read!(artifact))
    write_checksum(Path.join(out, Capsid.NIF.checksum_file()), name, sha256)

    Mix.shell().info("""
    #{artifact}
    SHA-256 #{sha256} (also in #{Capsid.NIF.checksum_file()} beside it)

    To build with it instead of cargo (before Capsid is compiled, e.g. in a fresh checkout):

        CAPSID_PREBUILT_NIF=#{artifact} \\
        CAPSID_PREBUILT_NIF_SHA256=#{sha256} mix deps.compile capsid --force

    or in config/config.exs:

        config :capsid, prebuilt_nif: [path: #{inspect(artifact)}, sha256: #{inspect(sha256)}]
    """)
  end

  # rustler_precompiled's checksum file: a map literal, one line per artifact,
  # sorted by name.
  defp write_checksum(file, name, sha256) do
    entries =
      with {:ok, text} <- File.read(file),
           {:ok, {:%{}, _, pairs}} <- Code.string_to_quoted(text) do
        for {key, value} when is_binary(key) and is_binary(value) <- pairs,
            into: %{},
            do: {key, value}
      else
        _ -> %{}
      end

    lines =
      for {key, value} <- Enum.sort(Map.put(entries, name, "sha256:" <> sha256)) do
        ~s(  #{inspect(key)} => #{inspect(value)},\n)
      end

    File.write!(file, ["%{\n", lines, "}\n"])
  end
end
