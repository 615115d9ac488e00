defmodule Capsid.Native do
  @moduledoc false
  # NIF stubs only. Each is replaced by the Rust function of the same name in
  # host_nif/src when the library loads; see those files for the contracts.

  @on_load :load_nif

  # The hook runs as soon as this module is loaded, also while the project
  # compiles: Capsid.NIF must be compiled (and loaded) first.
  require Capsid.NIF

  # Loads priv/native/libcapsid_nif.so once it matches the checksum recorded
  # when it was built or installed (`Capsid.NIF.load_path/0`).
  def load_nif do
    with {:ok, path} <- Capsid.NIF.load_path(), do: :erlang.load_nif(path, 0)
  end

  def component_compile(_bytes, _cache_dir), do: :erlang.nif_error(:nif_not_loaded)

  def instance_new(_component, _provided, _limits, _max_queue),
    do: :erlang.nif_error(:nif_not_loaded)

  def call_start(_instance, _name, _args, _limits, _queue), do: :erlang.nif_error(:nif_not_loaded)

  def call_resume(_instance, _reply), do: :erlang.nif_error(:nif_not_loaded)
  def call_cancel(_instance, _waited_ms), do: :erlang.nif_error(:nif_not_loaded)
  def call_dequeue(_instance), do: :erlang.nif_error(:nif_not_loaded)
  def instance_info(_instance), do: :erlang.nif_error(:nif_not_loaded)
  def instance_retire(_instance), do: :erlang.nif_error(:nif_not_loaded)
  def instance_idle(_instance), do: :erlang.nif_error(:nif_not_loaded)
end
