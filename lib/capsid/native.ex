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

  defp nif_error, do: :erlang.nif_error(:nif_not_loaded)

  # component.rs, cache.rs, node.rs
  def component_compile(_bytes, _cache, _flavor, _limits, _budget, _tag), do: nif_error()
  def cache_info(_dir), do: nif_error()
  def cache_clear(_dir), do: nif_error()
  def node_configure(_settings), do: nif_error()
  def node_info, do: nif_error()
  def component_wit(_bytes), do: nif_error()
  def wit_dir(_dir, _world), do: nif_error()

  # instance.rs, pool.rs, registry.rs
  def instance_new(_component, _imports, _limits, _queue, _wasi), do: nif_error()
  def instance_warm(_instance), do: nif_error()
  def instance_drain(_instance), do: nif_error()
  def instance_info(_instance), do: nif_error()
  def instance_retire(_instance), do: nif_error()
  def instance_idle(_instance), do: nif_error()
  def instance_hold(_instance), do: nif_error()
  def instance_unhold(_instance), do: nif_error()
  def instance_copy_state(_instance, _copy), do: nif_error()
  def pool_new(_members), do: nif_error()
  def pool_replace(_pool, _index, _member), do: nif_error()
  def pool_retire(_pool), do: nif_error()
  def registry_register(_target, _pid, _name), do: nif_error()
  def registry_unregister(_pid), do: nif_error()
  def registry_put_name(_name, _target), do: nif_error()

  # call.rs
  def call_start(_target, _function, _args, _narrow), do: nif_error()
  def call_start_dirty(_target, _function, _args, _narrow), do: nif_error()
  def call_start_on(_instance, _function, _args, _narrow), do: nif_error()
  def call_start_on_dirty(_instance, _function, _args, _narrow), do: nif_error()
  def call_resume(_instance), do: nif_error()
  def call_resume_dirty(_instance), do: nif_error()
  def import_take(_instance, _token), do: nif_error()
  def import_take_dirty(_instance, _token), do: nif_error()
  def import_answer(_instance, _token, _reply), do: nif_error()
  def import_answer_dirty(_instance, _token, _reply), do: nif_error()
  def import_answer_resume(_instance, _token, _reply), do: nif_error()
  def import_answer_resume_dirty(_instance, _token, _reply), do: nif_error()
  def call_cancel(_instance, _kind), do: nif_error()
  def call_dequeue(_instance), do: nif_error()
end
