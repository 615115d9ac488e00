defmodule Capsid.Cache do
  @moduledoc """
  The on-disk cache of compiled components (mirrors host_nif/src/cache.rs).

  Compiling a component takes from tens of milliseconds to seconds; a cached
  one loads in a few. Artifacts are keyed by the component's SHA-256 and the
  engine's configuration, and each is authenticated (HMAC-SHA256 under a
  secret key kept in the directory) before it is loaded: a corrupted or
  tampered file is discarded and recompiled, never loaded.

  ## Settings (application env of `:capsid`)

    * `:cache_dir` — the directory (default: the user cache directory,
      `~/.cache/capsid` on Linux, or `XDG_CACHE_HOME`).
    * `:cache_max_bytes` — the cache's size cap (default 1 GiB); when a new
      artifact pushes it over, the least recently used ones are deleted.

  The directory must belong to the current user and not be writable by
  others, and its key file must be private: a directory that is missing and
  cannot be created, read-only, shared, or otherwise unsafe is not used.
  Loading then simply compiles, after one warning in the log; it never fails
  because of the cache.

  Per load, `Capsid.Component.load(path, cache: false)` skips the cache and
  `cache: "/some/dir"` uses another directory.

      iex> %{entries: n, bytes: b} = Capsid.Cache.info()
      iex> is_integer(n) and is_integer(b)
      true
  """

  require Logger

  alias Capsid.Native

  @default_max_bytes 1024 * 1024 * 1024

  @doc "The cache directory in use (`:cache_dir`, else the user cache directory)."
  @spec dir() :: Path.t()
  def dir do
    Application.get_env(:capsid, :cache_dir) || :filename.basedir(:user_cache, "capsid")
  end

  @doc "The number of cached artifacts and their total size in bytes."
  @spec info() :: %{entries: non_neg_integer(), bytes: non_neg_integer()}
  def info, do: Native.cache_info(dir())

  @doc "Deletes every cached artifact; returns how many were deleted."
  @spec clear() :: non_neg_integer()
  def clear, do: Native.cache_clear(dir())

  @doc false
  # The NIF's cache argument for a load's `:cache` option.
  def settings(true), do: {dir(), max_bytes()}
  def settings(false), do: nil
  def settings(dir) when is_binary(dir), do: {dir, max_bytes()}

  def settings(other) do
    raise ArgumentError,
          "invalid value for :cache: expected true, false or a directory, got #{inspect(other)}"
  end

  defp max_bytes do
    case Application.get_env(:capsid, :cache_max_bytes, @default_max_bytes) do
      n when is_integer(n) and n >= 0 ->
        n

      other ->
        raise ArgumentError,
              "invalid value for config :capsid, :cache_max_bytes: expected a non-negative integer, got #{inspect(other)}"
    end
  end

  @doc false
  # Logs why the cache cannot be used, once per reason.
  def warn_unusable(reason) do
    key = {__MODULE__, :warned, reason}

    unless :persistent_term.get(key, false) do
      :persistent_term.put(key, true)
      Logger.warning("Capsid: not caching compiled components: #{reason}")
    end

    :ok
  end
end
