defmodule Capsid.NIF do
  @moduledoc false
  # Where the NIF library is, whether it is intact, and how a prebuilt one is
  # named. `Capsid.Native`'s `@on_load` hook loads the path `load_path/0`
  # returns; `mix compile` (the `:capsid` compiler in mix.exs) writes the
  # library and its checksum; `mix capsid.nif.package` makes an artifact.
  #
  # Artifacts are named and checksummed the way rustler_precompiled names and
  # checksums them, so that a hex release can move to it without renaming:
  # `libcapsid_nif-v0.1.0-nif-2.16-x86_64-unknown-linux-gnu.so.tar.gz`,
  # holding the `.so` of the same name, listed in
  # `checksum-Elixir.Capsid.Native.exs` as `"name" => "sha256:hex"`. That
  # SHA-256 is checked when the artifact is installed.
  #
  # The check before every load compares the installed library with the
  # CRC-32 recorded beside it when it was built or installed: it catches a
  # library that was changed or corrupted since, as a checksum should (who
  # can write priv/ can rewrite the record too, whatever the hash: the
  # artifact's SHA-256 is what authenticates a prebuilt NIF). A BIF, and a
  # fast one (~10 ms for the NIF, where `:erlang.md5/1` takes ~150 ms): in a
  # release's embedded mode the `@on_load` hooks run while the VM boots,
  # before `:crypto` can be called.

  @lib "libcapsid_nif"

  # The NIF API version the library is built for: rustler's `nif_version_2_16`
  # feature in host_nif/Cargo.toml (OTP 25 and newer load it).
  @nif_version "2.16"

  @doc "The NIF API version the library is built for."
  @spec nif_version() :: String.t()
  def nif_version, do: @nif_version

  @doc "The name of the checksum file beside prebuilt artifacts."
  @spec checksum_file() :: String.t()
  def checksum_file, do: "checksum-Elixir.Capsid.Native.exs"

  @doc "The installed library: `priv/native/libcapsid_nif.so`."
  @spec library() :: Path.t()
  def library, do: Path.join([:code.priv_dir(:capsid), "native", "#{@lib}.so"])

  @doc """
  The path to give `:erlang.load_nif/2` (without its extension), once the
  library's CRC-32 matches the one recorded beside it when it was built or
  installed; otherwise `{:error, {:checksum, message}}`, also logged.
  """
  @spec load_path(Path.t()) :: {:ok, charlist()} | {:error, {:checksum, String.t()}}
  def load_path(library \\ library()) do
    case verify(library) do
      :ok ->
        {:ok, library |> Path.rootname(".so") |> String.to_charlist()}

      {:error, message} ->
        :logger.error("Capsid NIF not loaded: " <> message)
        {:error, {:checksum, message}}
    end
  end

  @doc "Checks `library` against the CRC-32 recorded in `record_path(library)`."
  @spec verify(Path.t()) :: :ok | {:error, String.t()}
  def verify(library) do
    with {:ok, recorded} <- read(record_path(library), "its recorded checksum"),
         {:ok, bytes} <- read(library, "the library") do
      expected = String.trim(recorded)
      actual = checksum(bytes)

      if actual == expected do
        :ok
      else
        {:error,
         "#{library} does not match the checksum recorded when it was built or installed " <>
           "(CRC-32 #{expected} expected, #{actual} found): it was changed or corrupted since. " <>
           "Rebuild or reinstall it: mix deps.compile capsid --force"}
      end
    end
  end

  @doc "Where the library's checksum is recorded: `libcapsid_nif.so.crc32`."
  @spec record_path(Path.t()) :: Path.t()
  def record_path(library), do: library <> ".crc32"

  @doc "The checksum recorded for a library: its CRC-32, as 8 lowercase hex digits."
  @spec checksum(binary()) :: String.t()
  def checksum(bytes), do: <<:erlang.crc32(bytes)::32>> |> Base.encode16(case: :lower)

  defp read(path, what) do
    case File.read(path) do
      {:ok, bytes} ->
        {:ok, bytes}

      {:error, reason} ->
        {:error,
         "cannot read #{what}, #{path}: #{:file.format_error(reason)}. " <>
           "Build it with mix compile (or mix deps.compile capsid)"}
    end
  end

  @doc "Lowercase hex SHA-256 of `bytes`."
  @spec sha256(binary()) :: String.t()
  def sha256(bytes), do: :crypto.hash(:sha256, bytes) |> Base.encode16(case: :lower)

  @doc """
  The artifact name for a Capsid version and a target triple, as
  rustler_precompiled names it.

      iex> Capsid.NIF.artifact_name("0.1.0", "x86_64-unknown-linux-gnu")
      "libcapsid_nif-v0.1.0-nif-2.16-x86_64-unknown-linux-gnu.so.tar.gz"
  """
  @spec artifact_name(String.t(), String.t()) :: String.t()
  def artifact_name(version, target), do: library_name(version, target) <> ".tar.gz"

  @doc "The name of the library inside the artifact."
  @spec library_name(String.t(), String.t()) :: String.t()
  def library_name(version, target) do
    if String.contains?(target, "windows"),
      do: "capsid_nif-v#{version}-nif-#{@nif_version}-#{target}.dll",
      else: "#{@lib}-v#{version}-nif-#{@nif_version}-#{target}.so"
  end

  @doc """
  This machine's Rust target triple, derived from the VM's system
  architecture the way rustler_precompiled derives it
  (`x86_64-pc-linux-gnu` is `x86_64-unknown-linux-gnu`,
  `aarch64-apple-darwin23.4.0` is `aarch64-apple-darwin`).
  """
  @spec target() :: String.t()
  def target, do: target(to_string(:erlang.system_info(:system_architecture)))

  @doc false
  def target(system_architecture) do
    case String.split(system_architecture, "-") do
      [arch, _vendor, "darwin" <> _ | _] ->
        "#{if arch == "arm", do: "aarch64", else: arch}-apple-darwin"

      [arch, vendor, "linux" | abi] ->
        arch = if arch == "amd64", do: "x86_64", else: arch
        vendor = if vendor == "pc", do: "unknown", else: vendor
        Enum.join([arch, vendor, "linux" | abi], "-")

      _ ->
        system_architecture
    end
  end
end
